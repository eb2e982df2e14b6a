// The block's fused single-token decode step (docs/block.md, "Decoding a token at a time"): the gate,
// then the short convolution of the new token over the state, and the state's update, in one kernel.
//
//   h, k         [B, G, D] or [B, 1, G, D]   any row strides, as the gate reads them
//   v            [B, D] or [B, 1, D]
//   w_q, w_k     [G, D] or none
//   conv_weight  [G * D, 1, K];  conv_norm_weight [G, D]
//   conv_state   [B, (K - 1) * dilation, G, D], contiguous, the dtype of h: the short convolution's last
//                inputs o (RetrievalAttention.new_conv_state), updated in place
// returns
//   y            o + SiLU(conv(RMSNorm_g([conv_state; o]))) of the new token, o = a * v; the shape of h
//   a            [B, G] or [B, 1, G], the gate (float32, float64 for float64 inputs)
// Inference only: the Autograd kernel raises when a gradient would be needed.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "gate.h"

#include <cstdint>
#include <optional>
#include <tuple>

namespace retrieval_attention {

using DecodeStepOutputs = std::tuple<at::Tensor, at::Tensor>;  // y, a

// The operator's arguments, grouped: the gate's (no mask, residual off, no statistics), then the short
// convolution's and its state.
struct DecodeStepArgs {
  GateInputs gate;
  GateOptions options;
  at::Tensor conv_weight, conv_norm_weight, conv_state;
  int64_t dilation;
  double conv_eps;
};

// The schema's flat arguments (csrc/ops.cpp) as DecodeStepArgs.
inline DecodeStepArgs decode_step_args(const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                                       const at::Tensor& conv_weight, const at::Tensor& conv_norm_weight,
                                       const at::Tensor& conv_state, int64_t dilation, std::optional<double> eps,
                                       std::optional<double> scale, bool signed_sqrt, double sqrt_clamp,
                                       double conv_eps) {
  GateOptions options;
  options.eps = eps;
  options.scale = scale;
  options.signed_sqrt = signed_sqrt;
  options.sqrt_clamp = sqrt_clamp;
  options.residual = false;
  options.save_stats = false;
  return {GateInputs{h, k, v, w_q, w_k, std::nullopt},
          options,
          conv_weight,
          conv_norm_weight,
          conv_state,
          dilation,
          conv_eps};
}

// The schema's flat signature.
using DecodeStepFn = DecodeStepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                       std::optional<double>, std::optional<double>, bool, double, double);
using DecodeStepImpl = DecodeStepOutputs (*)(const DecodeStepArgs&);

// A kernel written against DecodeStepArgs, registered with the schema's signature:
//   m.impl("decode_step", TORCH_FN(decode_step_schema<&decode_step_cpu>));
template <DecodeStepImpl impl>
DecodeStepOutputs decode_step_schema(const at::Tensor& h, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                                     const at::Tensor& conv_weight, const at::Tensor& conv_norm_weight,
                                     const at::Tensor& conv_state, int64_t dilation, std::optional<double> eps,
                                     std::optional<double> scale, bool signed_sqrt, double sqrt_clamp,
                                     double conv_eps) {
  return impl(decode_step_args(h, k, v, w_q, w_k, conv_weight, conv_norm_weight, conv_state, dilation, eps, scale,
                               signed_sqrt, sqrt_clamp, conv_eps));
}

DecodeStepOutputs decode_step_cpu(const DecodeStepArgs& args);
DecodeStepOutputs decode_step_cuda(const DecodeStepArgs& args);

// retrieval_attention::decode_step through the dispatcher.
inline DecodeStepOutputs call_decode_step(const DecodeStepArgs& args) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::decode_step", "").typed<DecodeStepFn>();
  const auto& g = args.gate;
  const auto& o = args.options;
  return op.call(g.h, g.k, g.v, g.w_q, g.w_k, args.conv_weight, args.conv_norm_weight, args.conv_state, args.dilation,
                 o.eps, o.scale, o.signed_sqrt, o.sqrt_clamp, args.conv_eps);
}

}  // namespace retrieval_attention
