// Plain parameter structs handed from the host functions to the kernels of every backend.
//
// Pointers are untyped so one struct serves every dtype; the kernel casts them
// to the dtype it was instantiated for. Strides count elements. Rows of h, k and
// v are contiguous in D; their n (token) and g (branch) strides are free, so a
// slice of a fused projection is read in place.
#pragma once

#include <cstdint>

namespace retrieval_attention {

struct GateForwardParams {
  int64_t N;  // rows of v (tokens); h and k have N * G rows
  int64_t G;  // branches
  int64_t D;  // hidden size

  const void* h;
  const void* k;
  const void* v;
  const void* w;     // product weight w_q * w_k, [G, D] contiguous, acc dtype; nullptr means 1
  const bool* mask;  // [N] contiguous; nullptr means every row is kept
  int64_t h_stride_n, h_stride_g;
  int64_t k_stride_n, k_stride_g;
  int64_t v_stride_n;

  void* o;      // [N, G, D] contiguous, dtype of h
  void* a;      // [N, G] contiguous, acc dtype
  void* stats;  // [kNumStats, N, G] contiguous, acc dtype; nullptr: not wanted (inference)

  double eps;
  double scale;
  double sqrt_clamp;
  bool signed_sqrt;
  bool residual;
};

struct GateBackwardParams {
  int64_t N, G, D;

  const void* grad_o;  // [N, G, D], same layout rules as h
  const void* grad_a;  // [N, G] contiguous, acc dtype; nullptr means 0
  const void* h;
  const void* k;
  const void* v;
  const void* w;
  const bool* mask;
  const void* a;      // [N, G] contiguous, acc dtype: the forward's gate
  const void* stats;  // [kNumStats, N, G] contiguous, acc dtype
  int64_t go_stride_n, go_stride_g;
  int64_t h_stride_n, h_stride_g;
  int64_t k_stride_n, k_stride_g;
  int64_t v_stride_n;

  void* grad_h;           // [N, G, D] contiguous, dtype of h
  void* grad_k;           // [N, G, D] contiguous
  void* grad_v;           // [N, D] contiguous
  void* grad_w;           // [G, D] contiguous, acc dtype: sum_n(ds * scale * x_q * x_k); nullptr: not wanted
  void* grad_w_partials;  // [num_partials, G, D] acc dtype scratch, allocated by the backend's host code
  int64_t num_partials;

  double scale;
  double sqrt_clamp;
  bool signed_sqrt;
  bool residual;
};

}  // namespace retrieval_attention
