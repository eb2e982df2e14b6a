#include "common/decode_step_host.h"

#include <c10/util/Exception.h>

#include "common/short_conv_host.h"

#include <vector>

namespace retrieval_attention {
namespace {

constexpr const char* kOp = "retrieval_attention.decode_step";

}  // namespace

DecodeStepPlan plan_decode_step(const DecodeStepArgs& args, DecodeStepWeights weights,
                                std::optional<c10::ScalarType> gate_weight_dtype) {
  const auto& h = args.gate.h;
  // One token per sequence: the gate takes any leading dims, the step only these two.
  TORCH_CHECK_VALUE(h.dim() == 3 || (h.dim() == 4 && h.size(1) == 1), kOp,
                    ": expected `h` of shape [B, G, D] or [B, 1, G, D] (one token per sequence), but got ", h.sizes());
  DecodeStepPlan plan;
  const bool raw = weights == DecodeStepWeights::kRaw;
  // kRaw: no product weight, the kernel multiplies w_q and w_k itself.
  const auto& a = args.gate;
  const GateInputs gate_in = raw ? GateInputs{a.h, a.k, a.v, std::nullopt, std::nullopt, std::nullopt} : a;
  plan.gate = plan_gate_forward(gate_in, args.options, gate_weight_dtype, kOp);
  const auto& g = plan.gate.params;
  const int64_t B = g.N, G = g.G, D = g.D;
  check_gate_weight(kOp, "w_q", args.gate.w_q, h, G, D);
  check_gate_weight(kOp, "w_k", args.gate.w_k, h, G, D);
  const int64_t K = check_short_conv_params(kOp, h, G, D, args.conv_weight, args.conv_norm_weight, args.dilation,
                                            args.conv_eps, {"h", "conv_weight", "conv_norm_weight", "conv_eps"});
  const auto& state = args.conv_state;
  const std::vector<int64_t> state_shape{B, (K - 1) * args.dilation, G, D};
  TORCH_CHECK_TYPE(state.scalar_type() == h.scalar_type(), kOp, ": expected `conv_state` to have the dtype of `h` (",
                   h.scalar_type(), "), but got ", state.scalar_type());
  TORCH_CHECK(state.device() == h.device(), kOp, ": expected `conv_state` on the device of `h` (", h.device(),
              "), but got ", state.device());
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(state_shape), kOp,
                    ": expected `conv_state` of shape [B, (K - 1) * dilation, G, D] = ", at::IntArrayRef(state_shape),
                    ", but got ", state.sizes());
  TORCH_CHECK_VALUE(state.is_contiguous(), kOp,
                    ": expected a contiguous `conv_state` (it is updated in place), but got strides ", state.strides());

  auto& p = plan.params;
  p = DecodeStepParams{};
  p.gate = g;
  p.K = K;
  p.dilation = args.dilation;
  p.conv_eps = args.conv_eps;
  p.state = state.data_ptr();
  if (!raw) {
    const auto acc = acc_dtype(h.scalar_type());
    plan.taps = short_conv_taps(args.conv_weight, G, D, K, acc);
    plan.norm = args.conv_norm_weight.to(acc).contiguous();
    p.taps = plan.taps.data_ptr();
    p.norm = plan.norm.data_ptr();
    return plan;
  }
  // Contiguous views (no copy for parameters), kept alive by the plan.
  const auto keep = [](at::Tensor& slot, const at::Tensor& t, const void*& ptr, bool& is_float) {
    slot = t.contiguous();
    ptr = slot.data_ptr();
    is_float = slot.scalar_type() == at::kFloat;
  };
  if (args.gate.w_q.has_value()) {
    keep(plan.w_q, *args.gate.w_q, p.w_q, p.w_q_float);
  }
  if (args.gate.w_k.has_value()) {
    keep(plan.w_k, *args.gate.w_k, p.w_k, p.w_k_float);
  }
  keep(plan.weight, args.conv_weight, p.conv_weight, p.conv_weight_float);
  keep(plan.norm_weight, args.conv_norm_weight, p.conv_norm, p.conv_norm_float);
  return plan;
}

}  // namespace retrieval_attention
