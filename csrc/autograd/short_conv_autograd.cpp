// Autograd of the short convolution at the Autograd key: it saves x and the parameters only (the
// backward recomputes the norm and the convolution), and the backward is the op short_conv_backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "short_conv.h"

namespace retrieval_attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ShortConvFunction : public torch::autograd::Function<ShortConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& norm_weight, int64_t dilation, double eps, bool residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight, norm_weight});
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["residual"] = residual;
    return call_short_conv(x, weight, norm_weight, dilation, eps, residual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw, dnw] =
        call_short_conv_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["dilation"].toInt(),
                                 ctx->saved_data["eps"].toDouble(), ctx->saved_data["residual"].toBool());
    return {dx, dw, dnw, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor short_conv_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                               int64_t dilation, double eps, bool residual) {
  const bool needs_grad =
      at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || norm_weight.requires_grad());
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_short_conv(x, weight, norm_weight, dilation, eps, residual);
  }
  return ShortConvFunction::apply(x, weight, norm_weight, dilation, eps, residual);
}

// First-order only, as the gate's backward.
ShortConvGradients short_conv_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& norm_weight, int64_t dilation, double eps,
                                                bool residual) {
  TORCH_CHECK(!(at::GradMode::is_enabled() &&
                (grad_y.requires_grad() || x.requires_grad() || weight.requires_grad() || norm_weight.requires_grad())),
              "retrieval_attention.short_conv: double backward (create_graph=True through it) is not supported; ",
              "differentiate retrieval_attention.reference.short_conv instead");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_short_conv_backward(grad_y, x, weight, norm_weight, dilation, eps, residual);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  m.impl("short_conv", TORCH_FN(retrieval_attention::short_conv_autograd));
  m.impl("short_conv_backward", TORCH_FN(retrieval_attention::short_conv_backward_autograd));
}
