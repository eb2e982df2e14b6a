// CUDA fp8_lookup: the host function (checks, device guard, output, early return when empty) and its
// registration; the kernel and its launch plan are in fp8_lookup_kernel.cuh, which the C++ tests'
// emulator runs on the host too.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/fp8_lookup_host.h"
#include "cuda/common.cuh"
#include "cuda/fp8_lookup_kernel.cuh"
#include "fp8_lookup.h"

namespace retrieval_attention {

// Indices outside [0, R) are caught on the device (CUDA_KERNEL_ASSERT): a host check would cost a
// synchronization per call. The launch is checked by the launcher (C10_CUDA_KERNEL_LAUNCH_CHECK).
at::Tensor fp8_lookup_cuda(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                           at::ScalarType dtype) {
  TORCH_CHECK(rows.is_cuda(), "retrieval_attention.fp8_lookup: expected `rows` on the CUDA device of the other ",
              "inputs, but got ", rows.device());
  const c10::cuda::CUDAGuard device_guard(rows.device());
  auto plan = plan_fp8_lookup(rows, scales, indices, block, dtype);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  cuda::CudaLauncher launch(c10::cuda::getCurrentCUDAStream());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fp8_lookup_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(plan.indices.scalar_type(), "fp8_lookup_cuda",
                            [&] { cuda::run_fp8_lookup<scalar_t, index_t>(plan.params, launch); });
  });
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) { m.impl("fp8_lookup", &retrieval_attention::fp8_lookup_cuda); }
