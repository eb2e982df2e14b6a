// Autograd of the gate at the Autograd key, so Python, torch.compile and C++ programs
// all train through the same code. The backward is the registered op gate_backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "gate_op.h"

#include <initializer_list>

namespace retrieval_attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> to_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

bool requires_grad(std::initializer_list<std::optional<at::Tensor>> tensors) {
  for (const auto& t : tensors) {
    if (t.has_value() && t->defined() && t->requires_grad()) {
      return true;
    }
  }
  return false;
}

class GateFunction : public torch::autograd::Function<GateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                               std::optional<double> eps, std::optional<double> scale, bool signed_sqrt,
                               double sqrt_clamp, bool residual, const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, a, stats] =
        gate_op().call(h, k, v, w_q, w_k, eps, scale, signed_sqrt, sqrt_clamp, residual, mask, /*save_stats=*/true);
    ctx->save_for_backward({h, k, v, or_undefined(w_q), or_undefined(w_k), or_undefined(mask), a, stats});
    // The backward resolves a None scale from D itself, so no size is read here (D may be symbolic).
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["signed_sqrt"] = signed_sqrt;
    ctx->saved_data["sqrt_clamp"] = sqrt_clamp;
    ctx->saved_data["residual"] = residual;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {o, a, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr size_t kNumInputs = 11;
    variable_list result(kNumInputs);
    const auto& grad_o = grads[0];
    const auto& grad_a = grads[1];
    if (!grad_o.defined() && !grad_a.defined()) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const auto& h = saved[0];
    const auto& scale = ctx->saved_data["scale"];
    auto [dh, dk, dv, dw_q, dw_k] = gate_backward_op().call(
        grad_o.defined() ? grad_o : at::zeros_like(h, at::MemoryFormat::Contiguous), to_optional(grad_a), h, saved[1],
        saved[2], to_optional(saved[3]), to_optional(saved[4]), to_optional(saved[5]), saved[6], saved[7],
        scale.isNone() ? std::nullopt : std::optional<double>(scale.toDouble()),
        ctx->saved_data["signed_sqrt"].toBool(), ctx->saved_data["sqrt_clamp"].toDouble(),
        ctx->saved_data["residual"].toBool());
    result[0] = dh;
    result[1] = dk;
    result[2] = dv;
    result[3] = saved[3].defined() ? dw_q : at::Tensor();
    result[4] = saved[4].defined() ? dw_k : at::Tensor();
    return result;
  }
};

// Without grad the op runs below autograd: no graph node, nothing saved.
GateOutputs gate_autograd(const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                          std::optional<double> eps, std::optional<double> scale, bool signed_sqrt, double sqrt_clamp,
                          bool residual, const std::optional<at::Tensor>& mask, bool save_stats) {
  if (!(at::GradMode::is_enabled() && requires_grad({h, k, v, w_q, w_k}))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gate_op().call(h, k, v, w_q, w_k, eps, scale, signed_sqrt, sqrt_clamp, residual, mask, save_stats);
  }
  TORCH_CHECK_VALUE(save_stats, "retrieval_attention.gate: expected `save_stats` True when an input requires grad ",
                    "(the backward reads the statistics), but got False");
  auto out = GateFunction::apply(h, k, v, w_q, w_k, eps, scale, signed_sqrt, sqrt_clamp, residual, mask);
  return {out[0], out[1], out[2]};
}

// The backward is first-order only: with create_graph=True it would silently lose the graph.
GateGradients gate_backward_autograd(const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_a,
                                     const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                                     const std::optional<at::Tensor>& mask, const at::Tensor& a,
                                     const at::Tensor& stats, std::optional<double> scale, bool signed_sqrt,
                                     double sqrt_clamp, bool residual) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && requires_grad({grad_o, grad_a, h, k, v, w_q, w_k})),
              "retrieval_attention.gate: double backward (create_graph=True through the gate) is not supported; "
              "run the backward without create_graph, or differentiate retrieval_attention.reference.gate instead");
  at::AutoDispatchBelowADInplaceOrView guard;
  return gate_backward_op().call(grad_o, grad_a, h, k, v, w_q, w_k, mask, a, stats, scale, signed_sqrt, sqrt_clamp,
                                 residual);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  m.impl("gate", &retrieval_attention::gate_autograd);
  m.impl("gate_backward", &retrieval_attention::gate_backward_autograd);
}
