// CUDA forward of the gate: the host function (checks, device guard, allocation, launch on the
// current stream); the kernel and its launch plan are in gate_forward_kernel.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "cuda/common.cuh"
#include "cuda/gate_forward_kernel.cuh"
#include "gate_op.h"

namespace retrieval_attention {

GateOutputs gate_forward_cuda(const GateInputs& in, const GateOptions& options) {
  TORCH_CHECK(in.h.is_cuda(), "retrieval_attention.gate: expected `h` on the CUDA device of the other inputs, but got ",
              in.h.device());
  const c10::cuda::CUDAGuard device_guard(in.h.device());
  auto plan = plan_gate_forward(in, options);
  if (plan.params.N == 0) {
    return plan.outputs();
  }
  cuda::CudaLauncher launch(c10::cuda::getCurrentCUDAStream());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "retrieval_attention::gate (CUDA)",
                                  [&] { cuda::run_gate_forward<scalar_t>(plan.params, launch); });
  return plan.outputs();
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("gate", TORCH_FN(retrieval_attention::GateSchema::forward<&retrieval_attention::gate_forward_cuda>));
}
