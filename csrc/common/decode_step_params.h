// The plain parameter struct the decode step's host functions hand to its kernels (CPU and CUDA).
#pragma once

#include <c10/macros/Macros.h>

#include "common/gate_params.h"

#include <cstdint>

namespace retrieval_attention {

struct DecodeStepParams {
  // The gate's rows: N = B tokens of G branches; stats nullptr; o is y's buffer [B, G, D] contiguous
  // (the CPU kernel keeps each row's o there until it writes the row's y over it).
  GateForwardParams gate;
  int64_t K, dilation;
  double conv_eps;
  const void* taps;  // [G, K, D] acc, tap-major
  const void* norm;  // [G, D] acc
  void* state;       // [B, context, G, D] contiguous, dtype of h: the convolution's last inputs o

  // The parameters as given, for a kernel that reads them itself (CUDA: no conversion kernel before it):
  // w_q, w_k [G, D] (nullptr: none), conv_weight [G * D, K], conv_norm [G, D], contiguous, each float32
  // (its *_float flag) or the dtype of h. Then gate.w, taps and norm are nullptr.
  const void *w_q, *w_k, *conv_weight, *conv_norm;
  bool w_q_float, w_k_float, conv_weight_float, conv_norm_float;

  // The state rows, the tokens before the new one that its output reads.
  C10_HOST_DEVICE int64_t context() const { return (K - 1) * dilation; }
  // The state row of the token m * dilation before the new one (1 <= m <= K - 1).
  C10_HOST_DEVICE int64_t state_row(int64_t m) const { return context() - m * dilation; }
  // Element d of state row j of sequence (b, g).
  C10_HOST_DEVICE int64_t state_offset(int64_t b, int64_t g, int64_t j, int64_t d) const {
    return ((b * context() + j) * gate.G + g) * gate.D + d;
  }
};

}  // namespace retrieval_attention
