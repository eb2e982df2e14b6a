// The n-gram table's lookup as an operator (docs/ngram.md), for its backward: the table's dense
// gradient written in one pass, deterministic for any thread count.
//
//   weight       [R, dim]      floating
//   indices      [...]         int64 in [0, R), any strides
// lookup returns [..., dim]    weight's rows, contiguous
// lookup_backward(grad [..., dim], indices, num_rows R) returns [R, dim]: row r is the sum of the
// grad rows whose index is r, in index order (zero where none).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

namespace retrieval_attention {

// The checks every backend shares; they name the argument at fault.
void check_lookup(const char* op, const at::Tensor& weight_or_grad, const at::Tensor& indices, bool is_grad);

// weight's rows at the flattened indices, in the shape [..., dim] (after the backend's checks).
at::Tensor gather_rows(const at::Tensor& weight, const at::Tensor& indices);

at::Tensor lookup_cpu(const at::Tensor& weight, const at::Tensor& indices);
at::Tensor lookup_backward_cpu(const at::Tensor& grad, const at::Tensor& indices, int64_t num_rows);

inline at::Tensor call_lookup(const at::Tensor& weight, const at::Tensor& indices) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::lookup", "").typed<decltype(lookup_cpu)>();
  return op.call(weight, indices);
}

inline at::Tensor call_lookup_backward(const at::Tensor& grad, const at::Tensor& indices, int64_t num_rows) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("retrieval_attention::lookup_backward", "")
                             .typed<decltype(lookup_backward_cpu)>();
  return op.call(grad, indices, num_rows);
}

}  // namespace retrieval_attention
