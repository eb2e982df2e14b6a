// Typed handles of the registered gate operators, for C++ code that calls them through the
// dispatcher (autograd, autocast, C++ programs): such a call reaches every registered kernel.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "gate.h"

namespace retrieval_attention {

using GateForwardFn = decltype(gate_forward_cpu);
using GateBackwardFn = decltype(gate_backward_cpu);

// retrieval_attention::gate: (h, k, v, w_q, w_k, eps, scale, signed_sqrt, sqrt_clamp, residual,
// mask, save_stats) -> (o, a, stats).
inline const c10::TypedOperatorHandle<GateForwardFn>& gate_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::gate", "").typed<GateForwardFn>();
  return op;
}

inline const c10::TypedOperatorHandle<GateBackwardFn>& gate_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::gate_backward", "").typed<GateBackwardFn>();
  return op;
}

}  // namespace retrieval_attention
