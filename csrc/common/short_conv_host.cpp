#include "common/short_conv_host.h"

#include <c10/util/Exception.h>

#include "common/gate_host.h"

#include <cmath>

namespace retrieval_attention {

int64_t check_short_conv_params(const char* op, const at::Tensor& x, int64_t G, int64_t D, const at::Tensor& weight,
                                const at::Tensor& norm_weight, int64_t dilation, double eps,
                                const ShortConvNames& names) {
  const auto dtype = x.scalar_type();
  const auto check_param = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, op, ": expected `", name,
                     "` to have the dtype of `", names.x, "` (", dtype, ") or float32, but got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": expected `", name, "` on the device of `", names.x, "` (", x.device(),
                "), but got ", t.device());
  };
  check_param(names.weight, weight);
  check_param(names.norm_weight, norm_weight);
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) == G * D && weight.size(1) == 1 && weight.size(2) >= 1, op,
                    ": expected `", names.weight, "` of shape [G * D, 1, K] = [", G * D,
                    ", 1, K] with K >= 1, but got ", weight.sizes());
  TORCH_CHECK_VALUE(norm_weight.dim() == 2 && norm_weight.size(0) == G && norm_weight.size(1) == D, op, ": expected `",
                    names.norm_weight, "` of shape [G, D] = [", G, ", ", D, "], but got ", norm_weight.sizes());
  TORCH_CHECK_VALUE(dilation >= 1, op, ": expected `dilation` >= 1, but got ", dilation);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": expected `", names.eps, "` >= 0 and finite, but got ", eps);
  return weight.size(2);
}

at::Tensor short_conv_taps(const at::Tensor& weight, int64_t G, int64_t D, int64_t K, c10::ScalarType acc) {
  return weight.to(acc).reshape({G, D, K}).transpose(1, 2).contiguous();
}

ShortConvShape check_short_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& norm_weight, int64_t dilation, double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(is_supported_dtype(dtype), op,
                   ": expected `x` to have dtype float32, float64, float16 or bfloat16, but got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected `x` of shape [B, T, G, D], but got ", x.sizes());
  ShortConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), 0, dilation};
  TORCH_CHECK_VALUE(s.G >= 1 && s.D >= 1, op, ": expected `x` of shape [B, T, G, D] with G >= 1 and D >= 1, but got ",
                    x.sizes());
  s.K = check_short_conv_params(op, x, s.G, s.D, weight, norm_weight, dilation, eps);
  return s;
}

void check_short_conv_grad(const char* op, const at::Tensor& grad_y, const at::Tensor& x) {
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": expected `grad_y` to have the dtype of `x` (",
                   x.scalar_type(), "), but got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), op, ": expected `grad_y` of the shape of `x` ", x.sizes(),
                    ", but got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), op, ": expected `grad_y` on the device of `x` (", x.device(),
              "), but got ", grad_y.device());
}

ShortConvPlan plan_short_conv(const ShortConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& norm_weight, double eps, bool residual, const at::Tensor& grad_y) {
  ShortConvPlan pl;
  auto& p = pl.params;
  static_cast<ShortConvShape&>(p) = s;
  p.eps = eps;
  p.residual = residual;
  const auto acc = acc_dtype(x.scalar_type());
  pl.x = x.contiguous();
  pl.taps = short_conv_taps(weight, s.G, s.D, s.K, acc);
  pl.norm = norm_weight.to(acc).contiguous();
  p.x = pl.x.data_ptr();
  p.taps = pl.taps.data_ptr();
  p.norm = pl.norm.data_ptr();
  if (grad_y.defined()) {
    pl.grad_y = grad_y.contiguous();
    p.grad_y = pl.grad_y.data_ptr();
  }
  return pl;
}

ShortConvGradients short_conv_gradients(const at::Tensor& grad_x, const at::Tensor& sums, const ShortConvShape& s,
                                        const at::Tensor& weight, const at::Tensor& norm_weight) {
  at::Tensor grad_weight = sums.narrow(1, 0, s.K).transpose(1, 2).reshape({s.G * s.D, 1, s.K}).to(weight.scalar_type());
  at::Tensor grad_norm = sums.select(1, s.K).to(norm_weight.scalar_type()).contiguous();
  return {grad_x, grad_weight, grad_norm};
}

}  // namespace retrieval_attention
