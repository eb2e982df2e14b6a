// The boundary between the gate's schema (csrc/ops.cpp) and its C++ types (gate.h).
//
// The schema passes flat arguments: the inputs, then the options in the order of option_fields.
// GateSchema derives that signature from GateOptions, so a kernel is written once against the
// structs and registered through an adapter, and C++ callers call the op with the structs:
//
//   m.impl("gate", TORCH_FN(GateSchema::forward<&gate_forward_cpu>));
//   auto [o, a, stats] = call_gate({h, k, v, w_q, w_k, mask}, options);
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "gate.h"

#include <tuple>
#include <utility>

namespace retrieval_attention {
namespace detail {

using OptTensor = std::optional<at::Tensor>;
using ForwardImpl = GateOutputs (*)(const GateInputs&, const GateOptions&);
using BackwardImpl = GateGradients (*)(const GateBackwardInputs&, const GateInputs&, const GateOptions&);

template <typename Fields>
struct GateSchemaOf;

template <typename... Option>
struct GateSchemaOf<std::tuple<Option&...>> {
  // gate(h, k, v, w_q, w_k, *, mask, <options>) -> (o, a, stats)
  using Forward = GateOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, Option...);
  // gate_backward(grad_o, grad_a, a, stats, h, k, v, w_q, w_k, *, mask, <options>) -> gradients
  using Backward = GateGradients(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&, Option...);

  static GateOptions options(Option... values) {
    GateOptions o;
    option_fields(o) = std::forward_as_tuple(values...);
    return o;
  }

  template <ForwardImpl impl>
  static GateOutputs forward(const at::Tensor& h, const at::Tensor& k, const at::Tensor& v, const OptTensor& w_q,
                             const OptTensor& w_k, const OptTensor& mask, Option... values) {
    return impl(GateInputs{h, k, v, w_q, w_k, mask}, options(values...));
  }

  template <BackwardImpl impl>
  static GateGradients backward(const at::Tensor& grad_o, const OptTensor& grad_a, const at::Tensor& a,
                                const at::Tensor& stats, const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                                const OptTensor& w_q, const OptTensor& w_k, const OptTensor& mask, Option... values) {
    return impl(GateBackwardInputs{grad_o, grad_a, a, stats}, GateInputs{h, k, v, w_q, w_k, mask}, options(values...));
  }
};

}  // namespace detail

using GateSchema = detail::GateSchemaOf<decltype(option_fields(std::declval<GateOptions&>()))>;

// Typed handles of the registered operators: a call through them reaches every registered kernel
// (autograd, autocast, the backends).
inline const c10::TypedOperatorHandle<GateSchema::Forward>& gate_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::gate", "").typed<GateSchema::Forward>();
  return op;
}

inline const c10::TypedOperatorHandle<GateSchema::Backward>& gate_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("retrieval_attention::gate_backward", "")
                             .typed<GateSchema::Backward>();
  return op;
}

// retrieval_attention::gate through the dispatcher: (o, a, stats).
inline GateOutputs call_gate(const GateInputs& in, const GateOptions& options = {}) {
  return std::apply(
      [&](const auto&... values) { return gate_op().call(in.h, in.k, in.v, in.w_q, in.w_k, in.mask, values...); },
      option_fields(options));
}

// retrieval_attention::gate_backward through the dispatcher: (grad_h, grad_k, grad_v, grad_w_q, grad_w_k).
inline GateGradients call_gate_backward(const GateBackwardInputs& grads, const GateInputs& in,
                                        const GateOptions& options) {
  return std::apply(
      [&](const auto&... values) {
        return gate_backward_op().call(grads.grad_o, grads.grad_a, grads.a, grads.stats, in.h, in.k, in.v, in.w_q,
                                       in.w_k, in.mask, values...);
      },
      option_fields(options));
}

}  // namespace retrieval_attention
