// The block's short convolution as one operator (docs/block.md):
//   y = x + SiLU(CausalDilatedDepthwiseConv(RMSNorm_g(x)))       (residual=false: without x)
// x [B, T, G, D]; weight [G * D, 1, K] (nn.Conv1d's depthwise layout); norm_weight [G, D].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

// retrieval_attention::short_conv through the dispatcher.
inline at::Tensor call_short_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                                  int64_t dilation, double eps, bool residual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("retrieval_attention::short_conv", "")
                             .typed<decltype(short_conv_cpu)>();
  return op.call(x, weight, norm_weight, dilation, eps, residual);
}

// retrieval_attention::short_conv_backward through the dispatcher.
inline ShortConvGradients call_short_conv_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& norm_weight,
                                                   int64_t dilation, double eps, bool residual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("retrieval_attention::short_conv_backward", "")
                             .typed<decltype(short_conv_backward_cpu)>();
  return op.call(grad_y, x, weight, norm_weight, dilation, eps, residual);
}

}  // namespace retrieval_attention
