// Autograd of the gate at the Autograd key, so Python, torch.compile and C++ programs
// all train through the same code. The backward is the registered op gate_backward.
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "gate_op.h"

#include <initializer_list>
#include <type_traits>
#include <vector>

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

// The options as one tuple in the context's saved data, which holds only IValues.
c10::IValue options_to_ivalue(const GateOptions& options) {
  return std::apply([](const auto&... values) { return c10::ivalue::Tuple::create(c10::IValue(values)...); },
                    option_fields(options));
}

GateOptions options_from_ivalue(const c10::IValue& saved) {
  GateOptions options;
  // A vector, not the tuple's small inline storage, whose indexing past 3 GCC mistakes for out of bounds.
  const std::vector<c10::IValue> values = saved.toTupleRef().elements().vec();
  size_t i = 0;
  std::apply([&](auto&... fields) { ((fields = values[i++].to<std::decay_t<decltype(fields)>>()), ...); },
             option_fields(options));
  return options;
}

class GateFunction : public torch::autograd::Function<GateFunction> {
 public:
  // Tensors as arguments of their own, so that autograd sees them as inputs.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                               const std::optional<at::Tensor>& mask, const GateOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, a, stats] = call_gate({h, k, v, w_q, w_k, mask}, options);
    ctx->save_for_backward({h, k, v, or_undefined(w_q), or_undefined(w_k), or_undefined(mask), a, stats});
    // A None scale stays None: the backward resolves it from D itself (D may be symbolic here).
    ctx->saved_data["options"] = options_to_ivalue(options);
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {o, a, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr size_t kNumInputs = 7;
    variable_list result(kNumInputs);
    const auto& grad_o = grads[0];
    const auto& grad_a = grads[1];
    if (!grad_o.defined() && !grad_a.defined()) {
      return result;
    }
    const auto saved = ctx->get_saved_variables();
    const GateInputs in{
        saved[0], saved[1], saved[2], to_optional(saved[3]), to_optional(saved[4]), to_optional(saved[5])};
    const GateBackwardInputs upstream{grad_o.defined() ? grad_o : at::zeros_like(in.h, at::MemoryFormat::Contiguous),
                                      to_optional(grad_a), saved[6], saved[7]};
    auto [dh, dk, dv, dw_q, dw_k] = call_gate_backward(upstream, in, options_from_ivalue(ctx->saved_data["options"]));
    result[0] = dh;
    result[1] = dk;
    result[2] = dv;
    result[3] = in.w_q.has_value() ? dw_q : at::Tensor();
    result[4] = in.w_k.has_value() ? dw_k : at::Tensor();
    return result;
  }
};

// Without grad the op runs below autograd: no graph node, nothing saved.
GateOutputs gate_autograd(const GateInputs& in, const GateOptions& options) {
  if (!(at::GradMode::is_enabled() && requires_grad({in.h, in.k, in.v, in.w_q, in.w_k}))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gate(in, options);
  }
  TORCH_CHECK_VALUE(options.save_stats,
                    "retrieval_attention.gate: expected `save_stats` True when an input requires grad ",
                    "(the backward reads the statistics), but got False");
  auto out = GateFunction::apply(in.h, in.k, in.v, in.w_q, in.w_k, in.mask, options);
  return {out[0], out[1], out[2]};
}

// The backward is first-order only: with create_graph=True it would silently lose the graph.
GateGradients gate_backward_autograd(const GateBackwardInputs& grads, const GateInputs& in,
                                     const GateOptions& options) {
  TORCH_CHECK(
      !(at::GradMode::is_enabled() && requires_grad({grads.grad_o, grads.grad_a, in.h, in.k, in.v, in.w_q, in.w_k})),
      "retrieval_attention.gate: double backward (create_graph=True through the gate) is not supported; "
      "run the backward without create_graph, or differentiate retrieval_attention.reference.gate instead");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_gate_backward(grads, in, options);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  using retrieval_attention::GateSchema;
  m.impl("gate", TORCH_FN(GateSchema::forward<&retrieval_attention::gate_autograd>));
  m.impl("gate_backward", TORCH_FN(GateSchema::backward<&retrieval_attention::gate_backward_autograd>));
}
