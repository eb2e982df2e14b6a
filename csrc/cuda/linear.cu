// CUDA kernels of the projection (csrc/linear.h): cuBLAS through ATen's addmm, on the current stream.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear.h"

namespace retrieval_attention {
namespace {

at::Tensor mm_nt_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_with(&mm_nt_cuda, x, weight, bias);
}

LinearGradients linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                     std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_backward_with(&mm_nt_cuda, grad_y, x, weight, output_mask);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("linear", TORCH_FN(retrieval_attention::linear_cuda));
  m.impl("linear_backward", TORCH_FN(retrieval_attention::linear_backward_cuda));
}
