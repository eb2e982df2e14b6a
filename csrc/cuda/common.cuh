// Device helpers of the gate's CUDA kernels: vector packs, a deterministic block sum,
// and the host-side choice of vector width and grid size.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <initializer_list>

namespace retrieval_attention::cuda {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;  // one 128-bit load or store per thread and step

// kVec elements of T moved as one aligned access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& x) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = x;
}

// Sums kN values over the block; every thread gets the same totals (lane 0 of each warp
// publishes its warp's butterfly sum, then all threads add the warps in order).
// smem holds kN * (kThreads / kWarpSize) values; the trailing barrier makes it reusable.
template <int kThreads, int kN, typename T>
__device__ __forceinline__ void block_sum(T (&vals)[kN], T* smem) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      vals[i] += __shfl_xor_sync(0xffffffffu, vals[i], offset);
    }
    if (lane == 0) {
      smem[i * kWarps + warp] = vals[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    T total = smem[i * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      total += smem[i * kWarps + w];
    }
    vals[i] = total;
  }
  __syncthreads();
}

// The 16-byte path needs every row start on a 16-byte boundary: aligned bases, and row
// strides and D that are multiples of the pack. Otherwise the scalar path runs.
inline bool can_vectorize(int64_t vec, int64_t D, std::initializer_list<const void*> pointers,
                          std::initializer_list<int64_t> strides) {
  if (D % vec != 0) {
    return false;
  }
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kVectorBytes != 0) {
      return false;
    }
  }
  for (const int64_t s : strides) {
    if (s % vec != 0) {
      return false;
    }
  }
  return true;
}

// Enough blocks to fill the current GPU blocks_per_sm times over, never more than the work items.
// (The SM count comes from the runtime, not ATen/cuda/CUDAContext.h, which needs cuSPARSE's headers.)
inline int64_t grid_size(int64_t work_items, int blocks_per_sm) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  return work_items < cap ? work_items : cap;
}

}  // namespace retrieval_attention::cuda
