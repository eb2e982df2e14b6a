// Host-side checks and preparation of the short convolution, shared by its backends.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/short_conv_params.h"
#include "short_conv.h"

#include <cstdint>

namespace retrieval_attention {

// The argument names an operator's errors use for the short convolution's inputs.
struct ShortConvNames {
  const char* x = "x";  // the input whose dtype and device the parameters follow
  const char* weight = "weight";
  const char* norm_weight = "norm_weight";
  const char* eps = "eps";
};

// Checks weight, norm_weight, dilation and eps against an input `x` of G branches of D (its dtype,
// its device); returns K. The error names the argument as `names` spells it.
int64_t check_short_conv_params(const char* op, const at::Tensor& x, int64_t G, int64_t D, const at::Tensor& weight,
                                const at::Tensor& norm_weight, int64_t dilation, double eps,
                                const ShortConvNames& names = {});

// The taps [G * D, 1, K] as [G, K, D] in the accumulation dtype `acc`: tap-major, so the loops over D are contiguous.
at::Tensor short_conv_taps(const at::Tensor& weight, int64_t G, int64_t D, int64_t K, c10::ScalarType acc);

// Checks x, weight, norm_weight and the options; the error names the argument.
ShortConvShape check_short_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& norm_weight, int64_t dilation, double eps);

// Checks grad_y against x (dtype, shape, device); the error names the argument.
void check_short_conv_grad(const char* op, const at::Tensor& grad_y, const at::Tensor& x);

// The kernels' parameters, and the tensors that keep their buffers alive: x and grad_y contiguous, the
// taps [G, K, D] and the norm weight [G, D] in the accumulation dtype (float32 parameters with bfloat16 x too).
struct ShortConvPlan {
  ShortConvParams params{};
  at::Tensor x, grad_y, taps, norm;
};

ShortConvPlan plan_short_conv(const ShortConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& norm_weight, double eps, bool residual,
                              const at::Tensor& grad_y = at::Tensor());  // undefined in the forward

// (grad_x, grad_weight [G * D, 1, K], grad_norm_weight [G, D]), the last two in the parameters' dtypes
// from the sums [G, K + 1, D] of the partials (each tap's gradient, then the norm weight's).
ShortConvGradients short_conv_gradients(const at::Tensor& grad_x, const at::Tensor& sums, const ShortConvShape& s,
                                        const at::Tensor& weight, const at::Tensor& norm_weight);

}  // namespace retrieval_attention
