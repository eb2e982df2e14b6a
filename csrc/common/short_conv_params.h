// The short convolution's sizes and the plain parameter struct that its host functions hand to the
// kernels of every backend (docs/block.md).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace retrieval_attention {

struct ShortConvShape {
  int64_t B, T, G, D, K, dilation;

  // The rows before a token that its output reads.
  C10_HOST_DEVICE int64_t context() const { return (K - 1) * dilation; }
};

// Pointers are untyped, so one struct serves every dtype; the parameters are in the accumulation dtype.
struct ShortConvParams : ShortConvShape {
  double eps;
  bool residual;
  const void* x;       // [B, T, G, D] contiguous
  const void* grad_y;  // [B, T, G, D] contiguous (backward)
  void* out;           // y (forward) or grad_x (backward), [B, T, G, D] contiguous
  const void* taps;    // [G, K, D] acc, tap-major so the loops over D are contiguous
  const void* norm;    // [G, D] acc
  void* partials;      // acc (backward): the weight gradients' partial sums, in the layout of the backend's kernels
};

}  // namespace retrieval_attention
