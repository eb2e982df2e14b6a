// Plain parameter structs handed from the host functions to the kernels of every backend, and
// their one typed view.
//
// Pointers are untyped so one struct serves every dtype; a kernel instantiated for scalar_t reads
// them through GateForwardPointers / GateBackwardPointers. Strides count elements. Rows of h, k
// and v are contiguous in D; their n (token) and g (branch) strides are free, so a slice of a
// fused projection is read in place.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include "gate.h"

#include <cstdint>

namespace retrieval_attention {

// The inputs both directions read.
struct GateRowParams {
  int64_t N;  // rows of v (tokens); h and k have N * G rows
  int64_t G;  // branches
  int64_t D;  // hidden size

  const void* h;
  const void* k;
  const void* v;
  const void* w;     // product weight w_q * w_k, [G, D] contiguous, weight dtype (see gate_host.h); nullptr means 1
  const bool* mask;  // [N] contiguous; nullptr means every row is kept
  int64_t h_stride_n, h_stride_g;
  int64_t k_stride_n, k_stride_g;
  int64_t v_stride_n;

  GateOptions options;  // as given; eps and scale are read resolved, below
  double eps;
  double scale;
};

struct GateForwardParams : GateRowParams {
  void* o;      // [N, G, D] contiguous, dtype of h
  void* a;      // [N, G] contiguous, acc dtype
  void* stats;  // [kNumStats, N, G] contiguous, acc dtype; nullptr: not wanted (inference)
};

struct GateBackwardParams : GateRowParams {
  const void* grad_o;  // [N, G, D], same layout rules as h
  const void* grad_a;  // [N, G] contiguous, acc dtype; nullptr means 0
  const void* a;       // [N, G] contiguous, acc dtype: the forward's gate
  const void* stats;   // [kNumStats, N, G] contiguous, acc dtype
  int64_t go_stride_n, go_stride_g;

  void* grad_h;           // [N, G, D] contiguous, dtype of h
  void* grad_k;           // [N, G, D] contiguous
  void* grad_v;           // [N, D] contiguous
  void* grad_w;           // [G, D] contiguous, weight dtype: sum_n(ds * scale * x_q * x_k); nullptr: not wanted
  void* grad_w_partials;  // [num_partials, G, D] weight dtype scratch, allocated by the backend's host code
  int64_t num_partials;
};

// The pointers of GateRowParams in the types a kernel for scalar_t reads them as; weight_t is the
// weight dtype of the params (the accumulation type unless the backend chose otherwise).
template <typename scalar_t, typename weight_t = at::opmath_type<scalar_t>>
struct GateRowPointers {
  const scalar_t* h;
  const scalar_t* k;
  const scalar_t* v;
  const weight_t* w;

  C10_HOST_DEVICE explicit GateRowPointers(const GateRowParams& p)
      : h(static_cast<const scalar_t*>(p.h)),
        k(static_cast<const scalar_t*>(p.k)),
        v(static_cast<const scalar_t*>(p.v)),
        w(static_cast<const weight_t*>(p.w)) {}
};

template <typename scalar_t, typename weight_t = at::opmath_type<scalar_t>>
struct GateForwardPointers : GateRowPointers<scalar_t, weight_t> {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* o;
  acc_t* a;
  acc_t* stats;

  C10_HOST_DEVICE explicit GateForwardPointers(const GateForwardParams& p)
      : GateRowPointers<scalar_t, weight_t>(p),
        o(static_cast<scalar_t*>(p.o)),
        a(static_cast<acc_t*>(p.a)),
        stats(static_cast<acc_t*>(p.stats)) {}
};

template <typename scalar_t, typename weight_t = at::opmath_type<scalar_t>>
struct GateBackwardPointers : GateRowPointers<scalar_t, weight_t> {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_o;
  const acc_t* grad_a;
  const acc_t* a;
  const acc_t* stats;
  scalar_t* grad_h;
  scalar_t* grad_k;
  scalar_t* grad_v;
  weight_t* grad_w;
  weight_t* grad_w_partials;

  C10_HOST_DEVICE explicit GateBackwardPointers(const GateBackwardParams& p)
      : GateRowPointers<scalar_t, weight_t>(p),
        grad_o(static_cast<const scalar_t*>(p.grad_o)),
        grad_a(static_cast<const acc_t*>(p.grad_a)),
        a(static_cast<const acc_t*>(p.a)),
        stats(static_cast<const acc_t*>(p.stats)),
        grad_h(static_cast<scalar_t*>(p.grad_h)),
        grad_k(static_cast<scalar_t*>(p.grad_k)),
        grad_v(static_cast<scalar_t*>(p.grad_v)),
        grad_w(static_cast<weight_t*>(p.grad_w)),
        grad_w_partials(static_cast<weight_t*>(p.grad_w_partials)) {}
};

}  // namespace retrieval_attention
