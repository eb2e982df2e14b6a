// CPU kernels of the projection (csrc/linear.h): float32 products in oneDNN, through PyTorch's own
// registration of it (mkldnn::_linear_pointwise, which takes a plain weight of any strides); other
// dtypes, and builds without oneDNN, in ATen's addmm.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "linear.h"

namespace retrieval_attention {
namespace {

// oneDNN's inner product where this build of PyTorch registers it for the CPU.
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op = [] {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return found && found->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? found : std::nullopt;
  }();
  return op ? &*op : nullptr;
}

at::Tensor mm_nt_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  const auto* onednn = onednn_linear();
  if (onednn != nullptr && a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0) {
    // Boxed: the unboxed signature of this op changed across PyTorch releases.
    torch::jit::Stack stack{a,
                            b,
                            bias ? c10::IValue(*bias) : c10::IValue(),
                            c10::IValue("none"),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            c10::IValue()};
    onednn->callBoxed(&stack);
    return stack.back().toTensor();
  }
  return bias ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear_with(&mm_nt_cpu, x, weight, bias);
}

LinearGradients linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                    std::array<bool, 3> output_mask) {
  return linear_backward_with(&mm_nt_cpu, grad_y, x, weight, output_mask);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  m.impl("linear", TORCH_FN(retrieval_attention::linear_cpu));
  m.impl("linear_backward", TORCH_FN(retrieval_attention::linear_backward_cpu));
}
