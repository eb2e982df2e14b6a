// Entry points of the gate operator (SPEC §2, §2b), one pair per backend.
//
//   h, k    [..., G, D]   float32 / float64 / float16 / bfloat16
//   v       [..., D]      the dtype of h
//   w_q, w_k[G, D] or None, the dtype of h or float32
//   mask    [...] bool or None
// forward returns
//   o       [..., G, D]   a * v (h + a * v with residual), the dtype of h
//   a       [..., G]      the gate, float32 (float64 for float64 inputs)
//   stats   [3, ..., G]   r_q, r_k, s per row, the dtype of a: what the backward needs
//                         ([0] with save_stats = false: inference writes none)
// backward returns grad_h, grad_k, grad_v in their inputs' shapes and dtypes, and
// grad_w_q, grad_w_k [G, D] in their weights' dtypes ([0] when the weight is None).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace retrieval_attention {

using GateOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GateGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define RA_DECLARE_GATE_BACKEND(backend)                                                                              \
  GateOutputs gate_forward_##backend(                                                                                 \
      const at::Tensor& h, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& w_q,            \
      const std::optional<at::Tensor>& w_k, std::optional<double> eps, std::optional<double> scale, bool signed_sqrt, \
      double sqrt_clamp, bool residual, const std::optional<at::Tensor>& mask, bool save_stats);                      \
  GateGradients gate_backward_##backend(                                                                              \
      const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_a, const at::Tensor& h, const at::Tensor& k,    \
      const at::Tensor& v, const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,                \
      const std::optional<at::Tensor>& mask, const at::Tensor& a, const at::Tensor& stats,                            \
      std::optional<double> scale, bool signed_sqrt, double sqrt_clamp, bool residual);

RA_DECLARE_GATE_BACKEND(cpu)
RA_DECLARE_GATE_BACKEND(cuda)

#undef RA_DECLARE_GATE_BACKEND

}  // namespace retrieval_attention
