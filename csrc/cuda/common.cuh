// Host side of the CUDA kernels: the grid for the current GPU, and the launcher that the gate's
// run_gate_* functions drive (the C++ tests drive them with an emulator's launcher instead).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include "cuda/device_utils.cuh"

#include <cstddef>
#include <cstdint>
#include <utility>

namespace retrieval_attention::cuda {

constexpr size_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in

// (The device attributes come from the runtime, not ATen/cuda/CUDAContext.h, which needs cuSPARSE's headers.)
inline int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// Enough blocks to fill the current GPU blocks_per_sm times over, never more than the work items.
inline int64_t grid_size(int64_t work_items, int blocks_per_sm) {
  const int64_t cap = static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount)) * blocks_per_sm;
  return work_items < cap ? work_items : cap;
}

// Launches on the current stream: a kernel's resident blocks per SM from the occupancy calculator,
// and shared memory beyond the default through the per-kernel opt-in.
class CudaLauncher {
 public:
  explicit CudaLauncher(cudaStream_t stream)
      : stream_(stream),
        sms_(device_attribute(cudaDevAttrMultiProcessorCount)),
        smem_optin_(static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin))) {}

  size_t smem_budget() const { return smem_optin_; }

  // As many blocks as are resident at once on the whole GPU.
  template <typename... Args>
  int64_t max_blocks(void (*kernel)(Args...), int threads, size_t bytes) const {
    opt_in(kernel, bytes);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes));
    return static_cast<int64_t>(sms_) * (per_sm > 0 ? per_sm : 1);
  }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t grid, int threads, size_t bytes, Args&&... args) const {
    opt_in(kernel, bytes);
    kernel<<<static_cast<unsigned int>(grid), threads, bytes, stream_>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  template <typename Kernel>
  static void opt_in(Kernel kernel, size_t bytes) {
    if (bytes > kDefaultSharedBytes) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    }
  }

  cudaStream_t stream_;
  int sms_;
  size_t smem_optin_;
};

}  // namespace retrieval_attention::cuda
