// CUDA decode step (csrc/decode_step.h): the host function (checks, device guard, allocation, launch on
// the current stream, nothing read back to the host, so CUDA graphs capture it); the kernel and its
// launch plan are in decode_step_kernel.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/decode_step_host.h"
#include "cuda/common.cuh"
#include "cuda/decode_step_kernel.cuh"
#include "decode_step.h"

namespace retrieval_attention {

DecodeStepOutputs decode_step_cuda(const DecodeStepArgs& args) {
  constexpr const char* kOp = "retrieval_attention.decode_step";
  const auto& h = args.gate.h;
  TORCH_CHECK(h.is_cuda(), kOp, ": expected `h` on the CUDA device of the other inputs, but got ", h.device());
  const c10::cuda::CUDAGuard device_guard(h.device());
  const auto plan = plan_decode_step(args, DecodeStepWeights::kRaw);
  cuda::CudaLauncher launch(c10::cuda::getCurrentCUDAStream());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.gate.dtype, "decode_step shared memory", [&] {
    const size_t bytes = cuda::decode_step_shared_bytes<at::opmath_type<scalar_t>>(plan.params);
    TORCH_CHECK_VALUE(bytes <= launch.smem_budget(), kOp, ": the CUDA kernel needs ", bytes,
                      " bytes of shared memory for `conv_weight` of K = ", plan.params.K, " taps, but the GPU has ",
                      launch.smem_budget(), "; use fewer taps");
  });
  if (plan.params.gate.N == 0) {
    return plan.outputs();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.gate.dtype, "retrieval_attention::decode_step (CUDA)",
                                  [&] { cuda::run_decode_step<scalar_t>(plan.params, launch); });
  return plan.outputs();
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  using retrieval_attention::decode_step_schema;
  m.impl("decode_step", TORCH_FN(decode_step_schema<&retrieval_attention::decode_step_cuda>));
}
