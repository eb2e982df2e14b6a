// The projection's checks and both directions over a backend's matrix product (csrc/linear.h).
#include "linear.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace retrieval_attention {
namespace {

// The checks of both directions; they name the argument at fault.
void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": expected `weight` [out, in], but got a ", weight.dim(),
                    "-D tensor of shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": expected `x` [..., ", weight.size(1),
                    "] (in of weight ", weight.sizes(), "), but got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": expected `x` of a floating dtype, but got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
                   ": expected `weight` of x's dtype and device (", x.scalar_type(), ", ", x.device(), "), but got ",
                   weight.scalar_type(), ", ", weight.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": expected `bias` [", weight.size(0),
                      "], but got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                     ": expected `bias` of x's dtype and device (", x.scalar_type(), ", ", x.device(), "), but got ",
                     bias->scalar_type(), ", ", bias->device());
  }
}

}  // namespace

at::Tensor linear_with(MatmulNT mm_nt, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_linear("retrieval_attention.linear", x, weight, bias);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  return mm_nt(x.reshape({-1, x.size(-1)}), weight, bias).view(out_shape);
}

LinearGradients linear_backward_with(MatmulNT mm_nt, const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, std::array<bool, 3> output_mask) {
  check_linear("retrieval_attention.linear_backward", x, weight, std::nullopt);
  auto grad_shape = x.sizes().vec();
  grad_shape.back() = weight.size(0);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(grad_shape),
                    "retrieval_attention.linear_backward: expected `grad_y` ", at::IntArrayRef(grad_shape), " (x ",
                    x.sizes(), " through weight ", weight.sizes(), "), but got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
                   "retrieval_attention.linear_backward: expected `grad_y` of x's dtype and device (", x.scalar_type(),
                   ", ", x.device(), "), but got ", grad_y.scalar_type(), ", ", grad_y.device());
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const at::Tensor rows = grad_y.reshape({-1, weight.size(0)});
  const at::Tensor grad_x = output_mask[0] ? mm_nt(rows, weight.t(), std::nullopt).view(x.sizes()) : empty();
  const at::Tensor grad_weight =
      output_mask[1] ? mm_nt(rows.t(), x.reshape({-1, x.size(-1)}).t(), std::nullopt) : empty();
  const at::Tensor grad_bias = output_mask[2] ? rows.sum(0) : empty();
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace retrieval_attention
