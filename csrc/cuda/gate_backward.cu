// CUDA backward of the gate: the host function (checks, device guard, allocation, launch on the
// current stream); the kernels and their launch plan are in gate_backward_kernel.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "cuda/common.cuh"
#include "cuda/gate_backward_kernel.cuh"
#include "gate_op.h"

namespace retrieval_attention {

GateGradients gate_backward_cuda(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options) {
  TORCH_CHECK(in.h.is_cuda(), "retrieval_attention.gate_backward: expected `h` on the CUDA device of the other ",
              "inputs, but got ", in.h.device());
  const c10::cuda::CUDAGuard device_guard(in.h.device());
  auto plan = plan_gate_backward(grads, in, options);
  cuda::CudaLauncher launch(c10::cuda::getCurrentCUDAStream());
  // The shared memory of the dot-product parts grows with G: name the limit, not a launch failure.
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.dtype, "retrieval_attention::gate_backward (CUDA)", [&] {
        const int64_t max_g = cuda::backward_max_branches<at::opmath_type<scalar_t>>(launch.smem_budget());
        TORCH_CHECK_VALUE(plan.params.G <= max_g, "retrieval_attention.gate_backward: the CUDA kernel takes at most ",
                          max_g, " branches (G) in ", plan.dtype, " on this GPU, but `h` has ", plan.params.G);
      });
  if (plan.params.N == 0) {
    return finish_gate_backward(plan);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.dtype, "retrieval_attention::gate_backward (CUDA)", [&] {
        cuda::run_gate_backward<scalar_t>(plan.params, launch,
                                          [&](int64_t rows) { reserve_weight_grad_partials(plan, rows); });
      });
  return finish_gate_backward(plan);
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("gate_backward",
         TORCH_FN(retrieval_attention::GateSchema::backward<&retrieval_attention::gate_backward_cuda>));
}
