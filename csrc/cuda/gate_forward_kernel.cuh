// The gate's CUDA forward kernel and its launch plan, shared by gate_forward.cu and the C++ tests'
// emulator. One block per (token, branch) row, grid-strided over rows; the grid is a multiple of G,
// so a block keeps one branch and stages its product-weight row once. Pass 1 sums h^2, k^2 and
// h*k*w (one barrier per row: the block sum alternates two scratch buffers); pass 2 writes
// o = a * v (+ h), the h re-read hitting L1/L2.
#pragma once

#include <ATen/OpMathType.h>

#include "common/gate_math.h"
#include "common/gate_params.h"
#include "common/static_switch.h"
#include "cuda/device_utils.cuh"

#include <algorithm>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kForwardThreads = 128;
constexpr int kForwardWarps = kForwardThreads / kWarpSize;
constexpr int kForwardSums = 3;                                        // h^2, k^2, h*k*w
constexpr int64_t kForwardScratch = 2 * kForwardSums * kForwardWarps;  // two block-sum buffers
constexpr size_t kForwardMaxStagedBytes = 32 * 1024;  // beyond, w is read from L1/L2: blocks per SM stay high

struct GateForwardLayout {
  bool stage_w;  // the block's weight row in shared memory, after the scratch
  size_t bytes;  // dynamic shared memory
};

template <typename acc_t>
GateForwardLayout forward_layout(const GateForwardParams& p) {
  GateForwardLayout L;
  const size_t scratch = kForwardScratch * sizeof(acc_t);
  const size_t w_bytes = static_cast<size_t>(p.D) * sizeof(acc_t);
  L.stage_w = p.w != nullptr && w_bytes <= kForwardMaxStagedBytes;
  L.bytes = scratch + (L.stage_w ? w_bytes : 0);
  return L;
}

template <typename scalar_t, int kVec, bool kHasWeight, bool kResidual>
__global__ void __launch_bounds__(kForwardThreads)
    gate_forward_kernel(const GateForwardParams p, const GateForwardLayout L) {
  using acc_t = at::opmath_type<scalar_t>;
  const GateForwardPointers<scalar_t> ptr(p);
  const scalar_t* __restrict__ h = ptr.h;
  const scalar_t* __restrict__ k = ptr.k;
  const scalar_t* __restrict__ v = ptr.v;
  scalar_t* __restrict__ o = ptr.o;
  acc_t* smem = shared_memory<acc_t>();
  const int64_t G = p.G, D = p.D, rows = p.N * p.G;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * kVec;
  constexpr int64_t kStep = static_cast<int64_t>(kForwardThreads) * kVec;
  const int64_t g = blockIdx.x % G;

  // Each thread stages and later reads only its own columns: no barrier.
  const acc_t* __restrict__ w = nullptr;
  if constexpr (kHasWeight) {
    w = ptr.w + g * D;
    if (L.stage_w) {
      acc_t* staged = smem + kForwardScratch;
      for (int64_t d = first; d < D; d += kStep) {
        acc_t x[kVec];
        load_acc(w + d, x);
        store_acc(staged + d, x);
      }
      w = staged;
    }
  }

  int parity = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x, parity ^= 1) {
    const int64_t n = row / G;
    const scalar_t* hr = h + n * p.h_stride_n + g * p.h_stride_g;
    const scalar_t* kr = k + n * p.k_stride_n + g * p.k_stride_g;
    acc_t sums[kForwardSums] = {0, 0, 0};
    for (int64_t d = first; d < D; d += kStep) {
      const auto hv = load_from_row<scalar_t, kVec>(hr, d, D);
      const auto kv = load_from_row<scalar_t, kVec>(kr, d, D);
      [[maybe_unused]] acc_t wv[kVec];
      if constexpr (kHasWeight) {
        load_acc(w + d, wv);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const auto x = static_cast<acc_t>(hv.v[i]);
        const auto y = static_cast<acc_t>(kv.v[i]);
        sums[0] += x * x;
        sums[1] += y * y;
        if constexpr (kHasWeight) {
          sums[2] += x * wv[i] * y;
        } else {
          sums[2] += x * y;
        }
      }
    }
    block_sum<kForwardThreads>(sums, smem + parity * kForwardSums * kForwardWarps);
    const RowSums<acc_t> row_sums{sums[0], sums[1], sums[2]};
    const auto st = row_stats<acc_t>(row_sums, D, static_cast<acc_t>(p.eps), static_cast<acc_t>(p.scale));
    const bool keep = p.mask == nullptr || p.mask[n];
    const acc_t a = gate_value<acc_t>(st.s, p.options.signed_sqrt, static_cast<acc_t>(p.options.sqrt_clamp), keep);
    if (threadIdx.x == 0) {
      ptr.a[row] = a;
      if (ptr.stats != nullptr) {
        store_stats(ptr.stats, rows, row, st);
      }
    }

    const scalar_t* vr = v + n * p.v_stride_n;
    scalar_t* orow = o + row * D;
    for (int64_t d = first; d < D; d += kStep) {
      const auto vv = load_from_row<scalar_t, kVec>(vr, d, D);
      Pack<scalar_t, kVec> out;
      [[maybe_unused]] Pack<scalar_t, kVec> hv;
      if constexpr (kResidual) {
        hv = load_from_row<scalar_t, kVec>(hr, d, D);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc_t y = a * static_cast<acc_t>(vv.v[i]);
        if constexpr (kResidual) {
          y = static_cast<acc_t>(hv.v[i]) + y;
        }
        out.v[i] = static_cast<scalar_t>(y);
      }
      store_pack<scalar_t, kVec>(orow + d, out);
    }
  }
}

// Chooses the kernel and its grid, and launches it through `launch` (the CUDA runtime, or the
// tests' emulator): launch.max_blocks(kernel, threads, bytes) and launch(kernel, grid, threads, bytes, args...).
template <typename scalar_t, typename Launcher>
void run_gate_forward(const GateForwardParams& p, Launcher& launch) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const bool vectorize = p.D % kVec == 0;
  const GateForwardLayout L = forward_layout<acc_t>(p);
  RA_BOOL_SWITCH(vectorize, kVectorize, [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] {
        const auto kernel = gate_forward_kernel < scalar_t, kVectorize ? kVec : 1, kHasWeight, kResidual > ;
        // A multiple of G, so that row += grid keeps each block on one branch.
        const int64_t fill = launch.max_blocks(kernel, kForwardThreads, L.bytes);
        const int64_t grid = std::min(p.N * p.G, std::max(p.G, fill / p.G * p.G));
        launch(kernel, grid, kForwardThreads, L.bytes, p, L);
      });
    });
  });
}

}  // namespace retrieval_attention::cuda
