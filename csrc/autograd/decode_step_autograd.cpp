// The decode step at the Autograd key: inference only, so it has no backward. It raises, naming the
// argument, when grad mode is on and an input requires grad; else it runs the backend's kernel below
// autograd and bumps the version of conv_state, which it updates in place.
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "decode_step.h"

#include <utility>

namespace retrieval_attention {
namespace {

DecodeStepOutputs decode_step_autograd(const DecodeStepArgs& args) {
  const auto& g = args.gate;
  if (at::GradMode::is_enabled()) {
    const std::pair<const char*, const at::Tensor*> inputs[] = {{"h", &g.h},
                                                                {"k", &g.k},
                                                                {"v", &g.v},
                                                                {"w_q", g.w_q.has_value() ? &*g.w_q : nullptr},
                                                                {"w_k", g.w_k.has_value() ? &*g.w_k : nullptr},
                                                                {"conv_weight", &args.conv_weight},
                                                                {"conv_norm_weight", &args.conv_norm_weight},
                                                                {"conv_state", &args.conv_state}};
    for (const auto& [name, t] : inputs) {
      TORCH_CHECK(t == nullptr || !t->requires_grad(), "retrieval_attention.decode_step: `", name,
                  "` requires grad, but the decode step is inference only (it has no backward); call it under "
                  "torch.no_grad() or torch.inference_mode(), or run the gate and short_conv operators instead");
    }
  }
  DecodeStepOutputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_decode_step(args);
  }
  torch::autograd::impl::bump_version(args.conv_state);
  return out;
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  using retrieval_attention::decode_step_schema;
  m.impl("decode_step", TORCH_FN(decode_step_schema<&retrieval_attention::decode_step_autograd>));
}
