// The gate operator's C++ types and the backends' entry points (docs/gate.md).
//
//   h, k    [..., G, D]   float32 / float64 / float16 / bfloat16
//   v       [..., D]      the dtype of h
//   w_q, w_k[G, D] or none, the dtype of h or float32
//   mask    [...] bool or none
// forward returns
//   o       [..., G, D]   a * v (h + a * v with residual), the dtype of h
//   a       [..., G]      the gate, float32 (float64 for float64 inputs)
//   stats   [3, ..., G]   r_q, r_k, s per row, the dtype of a: what the backward needs
//                         ([0] with save_stats = false: inference writes none)
// backward returns grad_h, grad_k, grad_v in their inputs' shapes and dtypes, and
// grad_w_q, grad_w_k [G, D] in their weights' dtypes ([0] when the weight is none).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace retrieval_attention {

// The tensors the gate reads, named as in the schema.
struct GateInputs {
  at::Tensor h, k, v;
  std::optional<at::Tensor> w_q, w_k, mask;
};

// The gate's scalar options. The backward takes the same ones, so the autograd kernel hands them
// over whole; eps and save_stats have no effect there (the statistics hold the norms).
struct GateOptions {
  std::optional<double> eps;    // RMSNorm epsilon; none: torch.finfo(h.dtype).eps
  std::optional<double> scale;  // score scale; none: 1 / sqrt(D)
  bool signed_sqrt = true;      // a = sigmoid(sign(s) sqrt(max(|s|, sqrt_clamp))), else sigmoid(s)
  double sqrt_clamp = 1e-6;
  bool residual = false;   // o = h + a * v
  bool save_stats = true;  // write the statistics a backward reads (false: inference)
};

// The options in schema order: every conversion between the schema's flat arguments and the
// struct goes through this one list (csrc/gate_op.h, the autograd kernel).
template <typename Options>
auto option_fields(Options& o) {
  return std::tie(o.eps, o.scale, o.signed_sqrt, o.sqrt_clamp, o.residual, o.save_stats);
}

// What the backward reads besides the forward's inputs: the gradients reaching o and a (none: 0)
// and the forward's a and stats.
struct GateBackwardInputs {
  at::Tensor grad_o;
  std::optional<at::Tensor> grad_a;
  at::Tensor a, stats;
};

using GateOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // o, a, stats
// grad_h, grad_k, grad_v, grad_w_q, grad_w_k
using GateGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

GateOutputs gate_forward_cpu(const GateInputs& in, const GateOptions& options);
GateGradients gate_backward_cpu(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options);

GateOutputs gate_forward_cuda(const GateInputs& in, const GateOptions& options);
GateGradients gate_backward_cuda(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options);

}  // namespace retrieval_attention
