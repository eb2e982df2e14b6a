// The gate's CUDA backward kernels and their launch plan, shared by gate_backward.cu and the C++
// tests' emulator.
//
// One block per contiguous range of tokens. Per token:
//   1. threads over D: dv = sum_g a_g * go_g, and each thread's part of the G dot products go_g . v;
//   2. one barrier, then warp g (and g + warps, ...) sums dot product g in a fixed order and its
//      lane 0 turns it into the row's coefficients from the saved statistics; one barrier;
//   3. threads over the token's G * D elements: dh, dk, and the block's weight-gradient partial.
// The partial and the product weights live in shared memory for the block's life (where they fit)
// and each thread touches only its own columns, so they need no barrier; the partial is written
// once per block, then a second kernel sums the blocks' partials in a fixed order (no atomics).
#pragma once

#include <ATen/OpMathType.h>

#include "common/gate_math.h"
#include "common/gate_params.h"
#include "common/static_switch.h"
#include "cuda/device_utils.cuh"
#include "cuda/partials_reduce.cuh"

#include <algorithm>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kMaxBackwardThreads = 512;
constexpr int kBackwardMinBlocks = 1;  // registers up to 128: no spills (the shared memory allows one block or two)
constexpr int kBackwardPacksPerThread = 2;  // per token: two independent packs in flight per thread
constexpr int64_t kCoeffs = 3;              // cross, self_q, self_k of each branch

struct GateBackwardLayout {
  int threads;
  bool stage_w;   // the product weights [G, D] in shared memory
  bool stage_gw;  // the weight-gradient partial [G, D] in shared memory (else in its global row)
  int64_t coeff;  // offsets into shared memory, in accumulators
  int64_t w;
  int64_t gw;
  size_t bytes;
};

// [G, threads] dot-product parts, then [G, kCoeffs] coefficients, each on the 16-byte grid.
template <typename acc_t>
int64_t backward_base_elems(int64_t G, int64_t threads) {
  constexpr int64_t kGrid = kVectorBytes / sizeof(acc_t);
  return round_up(G * threads, kGrid) + round_up(G * kCoeffs, kGrid);
}

// The most branches the backward takes within `budget` bytes of shared memory.
template <typename acc_t>
int64_t backward_max_branches(size_t budget) {
  const auto fits = [&](int64_t G) {
    return backward_base_elems<acc_t>(G, kWarpSize) * static_cast<int64_t>(sizeof(acc_t)) <=
           static_cast<int64_t>(budget);
  };
  int64_t lo = 0, hi = static_cast<int64_t>(budget);  // fits(lo), and nothing above hi fits
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (fits(mid)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Threads: about kBackwardPacksPerThread packs each, in whole warps, halved while the dot-product
// parts do not fit. Then the partial, then the weights, in shared memory while they fit.
template <typename acc_t>
GateBackwardLayout backward_layout(const GateBackwardParams& p, int64_t vec, size_t budget) {
  GateBackwardLayout L;
  const int64_t packs = p.G * (p.D / vec);
  int64_t threads = round_up((packs + kBackwardPacksPerThread - 1) / kBackwardPacksPerThread, kWarpSize);
  threads = std::clamp<int64_t>(threads, kWarpSize, kMaxBackwardThreads);
  const auto bytes_of = [](int64_t elems) { return static_cast<size_t>(elems) * sizeof(acc_t); };
  while (threads > kWarpSize && bytes_of(backward_base_elems<acc_t>(p.G, threads)) > budget) {
    threads = std::max<int64_t>(kWarpSize, threads / 2 / kWarpSize * kWarpSize);
  }
  L.threads = static_cast<int>(threads);
  constexpr int64_t kGrid = kVectorBytes / sizeof(acc_t);
  const int64_t base = backward_base_elems<acc_t>(p.G, threads);
  const int64_t rows = round_up(p.G * p.D, kGrid);  // one [G, D] plane
  L.stage_gw = p.grad_w != nullptr && bytes_of(base + rows) <= budget;
  L.stage_w = L.stage_gw && bytes_of(base + 2 * rows) <= budget;
  L.coeff = round_up(p.G * threads, kGrid);
  L.gw = base;
  L.w = base + rows;
  L.bytes = bytes_of(base + (L.stage_gw ? rows : 0) + (L.stage_w ? rows : 0));
  return L;
}

template <typename scalar_t, int kVec, bool kHasWeight, bool kResidual>
__global__ void __launch_bounds__(kMaxBackwardThreads, kBackwardMinBlocks)
    gate_backward_kernel(const GateBackwardParams p, const GateBackwardLayout L) {
  using acc_t = at::opmath_type<scalar_t>;
  const GateBackwardPointers<scalar_t> ptr(p);
  const scalar_t* __restrict__ go = ptr.grad_o;
  const scalar_t* __restrict__ h = ptr.h;
  const scalar_t* __restrict__ k = ptr.k;
  const scalar_t* __restrict__ v = ptr.v;
  scalar_t* __restrict__ dh = ptr.grad_h;
  scalar_t* __restrict__ dk = ptr.grad_k;
  scalar_t* __restrict__ dv = ptr.grad_v;
  acc_t* smem = shared_memory<acc_t>();
  acc_t* part = smem;             // [G, threads]
  acc_t* coeff = smem + L.coeff;  // [G, kCoeffs]
  const int T = blockDim.x;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize, warp = tid / kWarpSize, warps = T / kWarpSize;
  const int64_t G = p.G, D = p.D, Dv = D / kVec, packs = G * Dv;

  // The block's tokens: N split into gridDim.x ranges that differ by at most one.
  const int64_t per = p.N / gridDim.x, extra = p.N % gridDim.x;
  const int64_t n_begin = blockIdx.x * per + std::min<int64_t>(blockIdx.x, extra);
  const int64_t n_end = n_begin + per + (blockIdx.x < extra ? 1 : 0);

  const acc_t* __restrict__ w = nullptr;
  acc_t* __restrict__ gw = nullptr;
  if constexpr (kHasWeight) {
    acc_t* partial_row = ptr.grad_w_partials + blockIdx.x * packs * kVec;
    w = L.stage_w ? smem + L.w : ptr.w;
    gw = L.stage_gw ? smem + L.gw : partial_row;
    for (int64_t q = tid; q < packs; q += T) {
      acc_t x[kVec];
      if (L.stage_w) {
        load_acc(ptr.w + q * kVec, x);
        store_acc(smem + L.w + q * kVec, x);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        x[i] = acc_t(0);
      }
      store_acc(gw + q * kVec, x);
    }
  }

  for (int64_t n = n_begin; n < n_end; ++n) {
    // 1. dv and this thread's parts of the G dot products.
    for (int64_t g = 0; g < G; ++g) {
      part[g * T + tid] = acc_t(0);
    }
    const scalar_t* vn = v + n * p.v_stride_n;
    for (int64_t q = tid; q < Dv; q += T) {
      const int64_t d = q * kVec;
      const auto vv = load_from_row<scalar_t, kVec>(vn, d, D);
      acc_t dv_acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dv_acc[i] = acc_t(0);
      }
#pragma unroll 4  // the loads of several branches in flight at once
      for (int64_t g = 0; g < G; ++g) {
        const auto gov = load_from_row<scalar_t, kVec>(go + n * p.go_stride_n + g * p.go_stride_g, d, D);
        const acc_t a = ptr.a[n * G + g];
        acc_t dot = 0;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const auto gradient = static_cast<acc_t>(gov.v[i]);
          dot += gradient * static_cast<acc_t>(vv.v[i]);
          dv_acc[i] += a * gradient;
        }
        part[g * T + tid] += dot;
      }
      Pack<scalar_t, kVec> dv_out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dv_out.v[i] = static_cast<scalar_t>(dv_acc[i]);
      }
      store_pack<scalar_t, kVec>(dv + n * D + d, dv_out);
    }
    __syncthreads();

    // 2. The dot products, each by one warp in a fixed order, and the coefficients by lane 0.
    const bool keep = p.mask == nullptr || p.mask[n];
    for (int64_t g = warp; g < G; g += warps) {
      acc_t da = 0;
      for (int j = lane; j < T; j += kWarpSize) {
        da += part[g * T + j];
      }
      da = warp_sum(da);
      if (lane == 0) {
        const int64_t row = n * G + g;
        const auto st = load_stats(ptr.stats, p.N * G, row);
        const acc_t total = ptr.grad_a != nullptr ? da + ptr.grad_a[row] : da;
        const acc_t ds = score_grad<acc_t>(total, ptr.a[row], st.s, p.options.signed_sqrt,
                                           static_cast<acc_t>(p.options.sqrt_clamp), keep);
        const auto c = row_grad_coeffs<acc_t>(st, ds, static_cast<acc_t>(p.scale), D);
        coeff[g * kCoeffs + 0] = c.cross;
        coeff[g * kCoeffs + 1] = c.self_q;
        coeff[g * kCoeffs + 2] = c.self_k;
      }
    }
    __syncthreads();

    // 3. dh, dk and the weight-gradient partial over the token's G * D elements (pack q is branch
    // g = q / Dv, columns (q % Dv) * kVec: followed incrementally, without a division per pack).
    // The next token's step 1 writes only this thread's parts; its barrier precedes new coefficients.
    int64_t g = tid / Dv, dq = tid % Dv;
#pragma unroll 2  // two packs' loads in flight
    for (int64_t q = tid; q < packs; q += T) {
      const int64_t d = dq * kVec;
      const acc_t cross = coeff[g * kCoeffs + 0];
      const acc_t self_q = coeff[g * kCoeffs + 1];
      const acc_t self_k = coeff[g * kCoeffs + 2];
      const auto gov = load_from_row<scalar_t, kVec>(go + n * p.go_stride_n + g * p.go_stride_g, d, D);
      const auto hv = load_from_row<scalar_t, kVec>(h + n * p.h_stride_n + g * p.h_stride_g, d, D);
      const auto kv = load_from_row<scalar_t, kVec>(k + n * p.k_stride_n + g * p.k_stride_g, d, D);
      [[maybe_unused]] acc_t wv[kVec];
      [[maybe_unused]] acc_t gwv[kVec];
      if constexpr (kHasWeight) {
        load_acc(w + q * kVec, wv);
        load_acc(gw + q * kVec, gwv);
      }
      Pack<scalar_t, kVec> dh_out, dk_out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const auto x = static_cast<acc_t>(hv.v[i]);
        const auto y = static_cast<acc_t>(kv.v[i]);
        acc_t wi = acc_t(1);
        if constexpr (kHasWeight) {
          wi = wv[i];
          gwv[i] += cross * x * y;
        }
        acc_t dx = cross * y * wi - self_q * x;
        if constexpr (kResidual) {
          dx += static_cast<acc_t>(gov.v[i]);
        }
        dh_out.v[i] = static_cast<scalar_t>(dx);
        dk_out.v[i] = static_cast<scalar_t>(cross * x * wi - self_k * y);
      }
      if constexpr (kHasWeight) {
        store_acc(gw + q * kVec, gwv);
      }
      const int64_t out = (n * G + g) * D + d;
      store_pack<scalar_t, kVec>(dh + out, dh_out);
      store_pack<scalar_t, kVec>(dk + out, dk_out);
      for (dq += T; dq >= Dv; dq -= Dv) {
        ++g;
      }
    }
  }

  if constexpr (kHasWeight) {
    if (L.stage_gw) {
      acc_t* partial_row = ptr.grad_w_partials + blockIdx.x * packs * kVec;
      for (int64_t q = tid; q < packs; q += T) {
        acc_t x[kVec];
        load_acc(gw + q * kVec, x);
        store_acc(partial_row + q * kVec, x);
      }
    }
  }
}

// Chooses the kernels, their grids and shared memory, allocates the partials through `reserve`
// (called with their row count), and launches through `launch` (see run_gate_forward).
template <typename scalar_t, typename Launcher, typename Reserve>
void run_gate_backward(GateBackwardParams& p, Launcher& launch, Reserve&& reserve) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const bool vectorize = p.D % kVec == 0;
  const GateBackwardLayout L = backward_layout<acc_t>(p, vectorize ? kVec : 1, launch.smem_budget());
  RA_BOOL_SWITCH(vectorize, kVectorize, [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] {
        const auto kernel = gate_backward_kernel < scalar_t, kVectorize ? kVec : 1, kHasWeight, kResidual > ;
        // One partial row per block: the sum over tokens is then fixed by N and the grid.
        const int64_t grid = std::min(p.N, launch.max_blocks(kernel, L.threads, L.bytes));
        reserve(grid);
        launch(kernel, grid, L.threads, L.bytes, p, L);
      });
    });
  });
  if (p.grad_w != nullptr) {
    reduce_partials<acc_t>(launch, static_cast<const acc_t*>(p.grad_w_partials), p.num_partials, p.G * p.D,
                           static_cast<acc_t*>(p.grad_w));
  }
}

}  // namespace retrieval_attention::cuda
