// Host-side work that every backend shares: input checks, defaults, canonical views,
// output allocation and the kernel parameter structs. A backend's host function is then
// plan -> (return early when empty) -> launch -> finish.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/gate_params.h"
#include "gate.h"

#include <optional>

namespace retrieval_attention {

// float32, float64, float16 or bfloat16: the dtypes every operator of the library takes.
bool is_supported_dtype(c10::ScalarType t);

// float64 for float64 inputs, float32 otherwise: the dtype of a, stats and weight sums.
c10::ScalarType acc_dtype(c10::ScalarType dtype);

// torch.finfo(dtype).eps, as torch.nn.RMSNorm(eps=None) uses.
double default_eps(c10::ScalarType dtype);

// 1 / sqrt(D) unless given.
double resolve_scale(std::optional<double> scale, int64_t D);

// Checks a gate RMSNorm weight `name` (w_q or w_k), if given, against h: [G, D], the dtype of h or float32, h's device.
void check_gate_weight(const char* op, const char* name, const std::optional<at::Tensor>& w, const at::Tensor& h,
                       int64_t G, int64_t D);

struct GateForwardPlan {
  at::Tensor o, a, stats;       // the op's outputs, in the caller's leading shape
  at::Tensor h, k, v, w, mask;  // canonical inputs, kept alive until the launch ends
  GateForwardParams params;
  c10::ScalarType dtype;

  GateOutputs outputs() const { return {o, a, stats}; }
};

// Checks every argument (the error names it), allocates the outputs and fills the params.
// weight_dtype: of the product weight and the weight-gradient sums, acc_dtype unless the kernels want wider;
// op: the operator the errors name (another operator that runs the gate inside).
GateForwardPlan plan_gate_forward(const GateInputs& in, const GateOptions& options,
                                  std::optional<c10::ScalarType> weight_dtype = std::nullopt,
                                  const char* op = "retrieval_attention.gate");

struct GateBackwardPlan {
  at::Tensor grad_h, grad_k, grad_v;
  at::Tensor grad_w;  // [G, D] weight dtype, sum over tokens; undefined without weights
  at::Tensor go, ga, h, k, v, w, mask, a, stats;
  at::Tensor grad_w_partials;  // [num_partials, G, D] weight dtype, the backend's scratch
  std::optional<at::Tensor> w_q, w_k;
  GateBackwardParams params;
  c10::ScalarType dtype;
};

GateBackwardPlan plan_gate_backward(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options,
                                    std::optional<c10::ScalarType> weight_dtype = std::nullopt);

// Allocates the backend's num_partials rows of weight-gradient partial sums (none without weights).
void reserve_weight_grad_partials(GateBackwardPlan& plan, int64_t num_partials);

// The chain rule through the product weight w = w_q * w_k: dw_q = dW * w_k, dw_k = dW * w_q.
// A weight given as None gets an empty [0] gradient.
GateGradients finish_gate_backward(const GateBackwardPlan& plan);

}  // namespace retrieval_attention
