// The block's short convolution as one operator (docs/block.md):
//   y = x + SiLU(CausalDilatedDepthwiseConv(RMSNorm_g(x)))       (residual=false: without x)
// x [B, T, G, D]; weight [G * D, 1, K] (nn.Conv1d's depthwise layout); norm_weight [G, D].
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace retrieval_attention {

struct ShortConvOptions {
  int64_t dilation = 3;
  double eps = 1e-5;
  bool residual = true;
};

using ShortConvGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // grad_x, grad_weight, grad_norm_weight

at::Tensor short_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                          int64_t dilation, double eps, bool residual);
ShortConvGradients short_conv_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& norm_weight, int64_t dilation, double eps, bool residual);
at::Tensor short_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                           int64_t dilation, double eps, bool residual);
ShortConvGradients short_conv_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& norm_weight, int64_t dilation, double eps, bool residual);

}  // namespace retrieval_attention
