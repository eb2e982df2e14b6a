// Host-side checks of the short convolution, shared by its backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace retrieval_attention {

struct ShortConvShape {
  int64_t B, T, G, D, K, dilation;
};

// Checks x, weight, norm_weight and the options; the error names the argument.
ShortConvShape check_short_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& norm_weight, int64_t dilation, double eps);

}  // namespace retrieval_attention
