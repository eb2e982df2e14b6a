// Autograd of the table lookup at the Autograd key: it saves the indices only, and the backward is
// the op lookup_backward (the table's dense gradient).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "lookup.h"

namespace retrieval_attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LookupFunction : public torch::autograd::Function<LookupFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& indices) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({indices});
    ctx->saved_data["num_rows"] = weight.size(0);
    return call_lookup(weight, indices);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {call_lookup_backward(grads[0], saved[0], ctx->saved_data["num_rows"].toInt()), at::Tensor()};
  }
};

at::Tensor lookup_autograd(const at::Tensor& weight, const at::Tensor& indices) {
  if (!(at::GradMode::is_enabled() && weight.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_lookup(weight, indices);
  }
  return LookupFunction::apply(weight, indices);
}

// First-order only, as the other operators' backwards.
at::Tensor lookup_backward_autograd(const at::Tensor& grad, const at::Tensor& indices, int64_t num_rows) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && grad.requires_grad()),
              "retrieval_attention.lookup: double backward (create_graph=True through it) is not supported; ",
              "use torch.nn.functional.embedding instead");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_lookup_backward(grad, indices, num_rows);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, Autograd, m) {
  m.impl("lookup", TORCH_FN(retrieval_attention::lookup_autograd));
  m.impl("lookup_backward", TORCH_FN(retrieval_attention::lookup_backward_autograd));
}
