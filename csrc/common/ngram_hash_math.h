// Per-element math of ngram_hash (docs/ngram.md), shared by the CPU and CUDA kernels so the
// CPU tests cover the exact arithmetic the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace retrieval_attention {

// a * b wrapping around in two's complement: unsigned multiplication is defined on overflow,
// signed is not, and the bit pattern is the same.
C10_HOST_DEVICE inline int64_t wrapping_mul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}

// a mod p in [0, p) for p > 0, as Python's and NumPy's `%` (C's `%` truncates toward zero).
// r is in (-p, p), so r + p cannot overflow.
C10_HOST_DEVICE inline int64_t floor_mod(int64_t a, int64_t p) {
  const int64_t r = a % p;
  return r < 0 ? r + p : r;
}

// The token i places before position t of a row (stride_t apart), or pad_id before the start of
// t's sequence, which begins at position start of the row (0 unless sequences are packed).
C10_HOST_DEVICE inline int64_t token_before(const int64_t* row, int64_t stride_t, int64_t t, int64_t i, int64_t pad_id,
                                            int64_t start = 0) {
  return t - start >= i ? row[(t - i) * stride_t] : pad_id;
}

// Where the packed sequence holding position t begins: the last cu_seqlens[s] <= t, found by
// bisection over the S + 1 offsets (cu_seqlens[0] == 0 <= t); 0 when nothing is packed.
C10_HOST_DEVICE inline int64_t sequence_start(const int64_t* cu_seqlens, int64_t num_offsets, int64_t t) {
  if (cu_seqlens == nullptr) {
    return 0;
  }
  int64_t lo = 0, hi = num_offsets;  // cu_seqlens[lo] <= t < cu_seqlens[hi] (hi past the end: +inf)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu_seqlens[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return cu_seqlens[lo];
}

// The mix of order n + 1 from that of order n and the n-th token back (mix of order 0 is 0).
C10_HOST_DEVICE inline int64_t mix_step(int64_t mix, int64_t token, int64_t multiplier) {
  return mix ^ wrapping_mul(token, multiplier);
}

// The mix of order n at position t, from scratch: XOR over i < n of x_{t-i} * m_i.
C10_HOST_DEVICE inline int64_t ngram_mix(const int64_t* row, int64_t stride_t, int64_t t, int64_t n,
                                         const int64_t* multipliers, int64_t pad_id, int64_t start = 0) {
  int64_t mix = 0;
  for (int64_t i = 0; i < n; ++i) {
    mix = mix_step(mix, token_before(row, stride_t, t, i, pad_id, start), multipliers[i]);
  }
  return mix;
}

}  // namespace retrieval_attention
