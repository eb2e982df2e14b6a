// The lookup's checks, shared by every backend (csrc/lookup.h).
#include "lookup.h"

#include <ATen/ops/index_select.h>
#include <c10/util/Exception.h>

namespace retrieval_attention {

void check_lookup(const char* op, const at::Tensor& weight_or_grad, const at::Tensor& indices, bool is_grad) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": expected `indices` of dtype int64, but got ",
                   indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(weight_or_grad.scalar_type()), op, ": expected `", is_grad ? "grad" : "weight",
                   "` of a floating dtype, but got ", weight_or_grad.scalar_type());
  TORCH_CHECK(indices.device() == weight_or_grad.device(), op, ": expected `indices` on ", weight_or_grad.device(),
              ", but got ", indices.device());
  if (is_grad) {
    TORCH_CHECK_VALUE(
        weight_or_grad.dim() == indices.dim() + 1 && weight_or_grad.sizes().slice(0, indices.dim()) == indices.sizes(),
        op, ": expected `grad` [", indices.sizes(), ", dim] (the shape of indices, then dim), but got ",
        weight_or_grad.sizes());
  } else {
    TORCH_CHECK_VALUE(weight_or_grad.dim() == 2, op, ": expected `weight` [R, dim], but got ", weight_or_grad.sizes());
  }
}

at::Tensor gather_rows(const at::Tensor& weight, const at::Tensor& indices) {
  auto shape = indices.sizes().vec();
  shape.push_back(weight.size(1));
  return at::index_select(weight, 0, indices.reshape({-1})).view(shape);
}

}  // namespace retrieval_attention
