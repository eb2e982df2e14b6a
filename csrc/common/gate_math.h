// Row math of the gate (docs/gate.md), shared by the CPU and CUDA kernels.
//
// Everything here works on one (n, g) row's scalars, in the accumulation type
// acc_t (float, or double for double inputs). The kernels only stream the
// D-long vectors; every decision about a row is made by these functions, so the
// CPU tests cover the exact math the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace retrieval_attention {

// Per-row statistics saved for the backward: stats[kRq], stats[kRk], stats[kScore].
constexpr int64_t kStatRq = 0;
constexpr int64_t kStatRk = 1;
constexpr int64_t kStatScore = 2;
constexpr int64_t kNumStats = 3;

template <typename acc_t>
struct RowStats {
  acc_t r_q;  // 1 / rms(h) with eps
  acc_t r_k;  // 1 / rms(k) with eps
  acc_t s;    // scaled dot product of the normalized rows
};

// The statistics in another precision: a kernel may compute a row wider than it saves it.
template <typename to_t, typename from_t>
C10_HOST_DEVICE inline RowStats<to_t> cast_stats(const RowStats<from_t>& st) {
  return {static_cast<to_t>(st.r_q), static_cast<to_t>(st.r_k), static_cast<to_t>(st.s)};
}

// The saved statistics are [kNumStats, rows]: one plane per statistic, so writes coalesce.
template <typename acc_t>
C10_HOST_DEVICE inline void store_stats(acc_t* stats, int64_t rows, int64_t row, const RowStats<acc_t>& st) {
  stats[kStatRq * rows + row] = st.r_q;
  stats[kStatRk * rows + row] = st.r_k;
  stats[kStatScore * rows + row] = st.s;
}

template <typename acc_t>
C10_HOST_DEVICE inline RowStats<acc_t> load_stats(const acc_t* stats, int64_t rows, int64_t row) {
  return {stats[kStatRq * rows + row], stats[kStatRk * rows + row], stats[kStatScore * rows + row]};
}

// Sums over D of one row: h^2, k^2 and h * k * w (w the product weight, or 1).
template <typename acc_t>
struct RowSums {
  acc_t sq_h;
  acc_t sq_k;
  acc_t dot;
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_rms(acc_t sum_sq, int64_t D, acc_t eps) {
  return acc_t(1) / std::sqrt(sum_sq / static_cast<acc_t>(D) + eps);
}

template <typename acc_t>
C10_HOST_DEVICE inline RowStats<acc_t> row_stats(const RowSums<acc_t>& sums, int64_t D, acc_t eps, acc_t scale) {
  RowStats<acc_t> st;
  st.r_q = inv_rms(sums.sq_h, D, eps);
  st.r_k = inv_rms(sums.sq_k, D, eps);
  // sum_d(x_q * x_k * w) = r_q * r_k * sum_d(h * k * w): the rows are never normalized in memory.
  st.s = scale * (sums.dot * st.r_q * st.r_k);
  return st;
}

// u = sign(s) * sqrt(max(|s|, c)), with sign(0) = 0 (so s = 0 gives a = 0.5) and NaN kept.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t signed_sqrt(acc_t s, acc_t clamp) {
  const acc_t root = std::sqrt(std::fabs(s) > clamp ? std::fabs(s) : clamp);
  return s > acc_t(0) ? root : (s < acc_t(0) ? -root : s);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid(acc_t u) {
  return acc_t(1) / (acc_t(1) + std::exp(-u));
}

// The gate a of one row; a masked-out row (keep = false) gets 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gate_value(acc_t s, bool use_signed_sqrt, acc_t clamp, bool keep) {
  if (!keep) {
    return acc_t(0);
  }
  return sigmoid(use_signed_sqrt ? signed_sqrt(s, clamp) : s);
}

// dL/ds from dL/da. Below the clamp the signed square root is flat, so its slope is 0;
// a select, not a product, because the other branch is infinite at s = 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t score_grad(acc_t da, acc_t a, acc_t s, bool use_signed_sqrt, acc_t clamp, bool keep) {
  if (!keep) {
    return acc_t(0);
  }
  const acc_t du = da * a * (acc_t(1) - a);
  if (!use_signed_sqrt) {
    return du;
  }
  const acc_t abs_s = std::fabs(s);
  return abs_s >= clamp ? du / (acc_t(2) * std::sqrt(abs_s)) : acc_t(0);
}

// Per-row coefficients of the backward's elementwise pass, in the raw (unnormalized) inputs:
//   dh = cross * k * w - self_q * h      dk = cross * h * w - self_k * k      dW += cross * h * k
// from dh = r_q * (ds * scale * x_k * w - x_q * ds * s / D) and its twin for k (docs/gate.md).
template <typename acc_t>
struct RowGradCoeffs {
  acc_t cross;
  acc_t self_q;
  acc_t self_k;
};

template <typename acc_t>
C10_HOST_DEVICE inline RowGradCoeffs<acc_t> row_grad_coeffs(const RowStats<acc_t>& st, acc_t ds, acc_t scale,
                                                            int64_t D) {
  RowGradCoeffs<acc_t> c;
  const acc_t ds_s_over_d = ds * st.s / static_cast<acc_t>(D);
  c.cross = ds * scale * st.r_q * st.r_k;
  c.self_q = ds_s_over_d * st.r_q * st.r_q;
  c.self_k = ds_s_over_d * st.r_k * st.r_k;
  return c;
}

}  // namespace retrieval_attention
