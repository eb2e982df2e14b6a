// Autograd of the projection at the Autograd key: it saves x and the weight, and the backward is
// the op linear_backward with the mask of the inputs that need a gradient.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "linear.h"

namespace retrieval_attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return call_linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [dx, dw, db] = call_linear_backward(
        grads[0], saved[0], saved[1],
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(), ctx->needs_input_grad(1) ? dw : at::Tensor(),
            has_bias && ctx->needs_input_grad(2) ? db : at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool needs_grad =
      at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || (bias && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_linear(x, weight, bias);
  }
  return LinearFunction::apply(x, weight, bias);
}

// First-order only, as the other operators' backwards.
LinearGradients linear_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         std::array<bool, 3> output_mask) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && (grad_y.requires_grad() || x.requires_grad() || weight.requires_grad())),
              "retrieval_attention.linear: double backward (create_graph=True through it) is not supported; ",
              "use torch.nn.functional.linear instead");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_linear_backward(grad_y, x, weight, output_mask);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  m.impl("linear", TORCH_FN(retrieval_attention::linear_autograd));
  m.impl("linear_backward", TORCH_FN(retrieval_attention::linear_backward_autograd));
}
