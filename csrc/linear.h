// The block's projection as an operator (docs/block.md): y = x @ weight^T + bias, whose CPU kernel
// uses oneDNN's float32 product (PyTorch's addmm uses MKL, which runs AMD CPUs on its AVX2 path).
//
//   x            [..., in]     float32, float64, float16 or bfloat16, any strides
//   weight       [out, in]     the dtype and device of x
//   bias         [out]         optional
// returns        [..., out]    contiguous
//
// linear_backward(grad_y, x, weight, output_mask) gives (grad_x, grad_weight, grad_bias); an output
// whose mask entry is false is an empty [0] tensor, as is grad_bias of a block without bias.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace retrieval_attention {

using LinearGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // grad_x, grad_weight, grad_bias

// Both directions, their checks included, on top of a backend's a @ b^T (+ bias) for 2-D a [m, k] and
// b [n, k] of any strides.
using MatmulNT = at::Tensor (*)(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias);
at::Tensor linear_with(MatmulNT mm_nt, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);
LinearGradients linear_backward_with(MatmulNT mm_nt, const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& weight, std::array<bool, 3> output_mask);

inline at::Tensor call_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("retrieval_attention::linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias);
}

inline LinearGradients call_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("retrieval_attention::linear_backward", "")
          .typed<LinearGradients(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>();
  return op.call(grad_y, x, weight, output_mask);
}

}  // namespace retrieval_attention
