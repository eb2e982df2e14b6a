// The short convolution's CUDA kernels and their launch plans (docs/block.md), shared by
// short_conv.cu and the C++ tests' emulator.
//
// Both directions split each (b, g) sequence into tiles of tokens. A block first finds 1 / rms of
// every row its tile reads (a warp per row, into shared memory); then each thread owns columns and
// sweeps the tile's tokens, re-reading the few context rows of x through L1 rather than keeping a
// normalized copy. Forward: z, then SiLU (+ x). Backward, per tile [t0, t1): gz_s = grad_y_s *
// SiLU'(z_s) for s in [t0, t1 + context), staged per column in shared memory; pass 1 gives the
// weight gradients and each thread's part of the RMSNorm row sums; one block reduction per row;
// pass 2 re-stages gz and writes grad_x. Each block adds the weight gradients of its tiles to its own
// partial row, and partials_reduce sums the rows in a fixed order (no atomics).
#pragma once

#include <ATen/OpMathType.h>

#include "common/gate_math.h"
#include "common/short_conv_math.h"
#include "common/short_conv_params.h"
#include "common/static_switch.h"
#include "cuda/device_utils.cuh"
#include "cuda/partials_reduce.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kShortConvThreads = 128;
constexpr int64_t kShortConvTile = 32;          // tokens per tile: the context rows are re-read once per tile
constexpr int kShortConvBackwardMinBlocks = 4;  // registers up to 128: unbounded, ptxas spills in float64

// Where the value of row q + m * dilation lives, for the tile's tokens q and tap offsets m in
// [m_lo, m_hi]: one contiguous range of rows while the taps' rows overlap (dilation < tile), else one
// tile-sized range per offset, so a wide dilation never spans the rows between its taps.
struct RowSlots {
  int64_t t0, tile, dilation, m_lo;
  bool dense;

  C10_HOST_DEVICE int64_t slot(int64_t row, int64_t m) const {
    return dense ? row - (t0 + m_lo * dilation) : (m - m_lo) * tile + (row - m * dilation - t0);
  }
  C10_HOST_DEVICE int64_t row(int64_t slot) const {
    return dense ? t0 + m_lo * dilation + slot : t0 + slot % tile + (m_lo + slot / tile) * dilation;
  }
  // The offset m a slot was placed for (any in range where dense: slot() then ignores it).
  C10_HOST_DEVICE int64_t offset(int64_t slot) const { return dense ? m_lo : m_lo + slot / tile; }
  C10_HOST_DEVICE static int64_t count(int64_t tile, int64_t dilation, int64_t m_lo, int64_t m_hi, bool dense) {
    return dense ? tile + (m_hi - m_lo) * dilation : (m_hi - m_lo + 1) * tile;
  }
};

struct ShortConvLayout {
  int threads;
  int64_t tile, tiles;    // tokens per tile, tiles per sequence
  int64_t splits;         // backward: tile ranges per sequence, one block and one partial row each
  bool dense;             // see RowSlots
  int64_t r_slots;        // 1 / rms of the rows read, offsets [-(K - 1), 0] (forward) or [-(K - 1), K - 1]
  int64_t gz_slots;       // backward: gz of the tokens [t0, t1 + context), offsets [0, K - 1], per thread
  int64_t coef, gz, dot;  // backward: offsets into shared memory, in accumulators
  size_t bytes;
};

template <typename acc_t>
ShortConvLayout forward_layout(const ShortConvShape& s) {
  ShortConvLayout L{};
  L.threads = kShortConvThreads;
  L.tile = kShortConvTile;
  L.tiles = (s.T + L.tile - 1) / L.tile;
  L.dense = s.dilation < L.tile;
  L.r_slots = RowSlots::count(L.tile, s.dilation, -(s.K - 1), 0, L.dense);
  L.bytes = static_cast<size_t>(L.r_slots) * sizeof(acc_t);
  return L;
}

// 1 / rms, the row coefficients, then per thread the gz rows and the row-sum parts, each on the
// 16-byte grid. Threads halve (down to a warp) while that exceeds `budget`.
template <typename acc_t>
ShortConvLayout backward_layout(const ShortConvShape& s, size_t budget) {
  ShortConvLayout L = forward_layout<acc_t>(s);
  L.r_slots = RowSlots::count(L.tile, s.dilation, -(s.K - 1), s.K - 1, L.dense);
  L.gz_slots = RowSlots::count(L.tile, s.dilation, 0, s.K - 1, L.dense);
  constexpr int64_t kGrid = kVectorBytes / sizeof(acc_t);
  const auto plan = [&](int threads) {
    L.threads = threads;
    L.coef = round_up(L.r_slots, kGrid);
    L.gz = L.coef + round_up(L.tile, kGrid);
    L.dot = L.gz + round_up(L.gz_slots * threads, kGrid);
    L.bytes = static_cast<size_t>(L.dot + L.tile * threads) * sizeof(acc_t);
  };
  plan(kShortConvThreads);
  while (L.threads > kWarpSize && L.bytes > budget) {
    plan(L.threads / 2);
  }
  return L;
}

// The rows of one (b, g) sequence: element d of token t at offset(t) + d.
struct SequenceRows {
  int64_t base, stride;
  C10_HOST_DEVICE int64_t offset(int64_t t) const { return base + t * stride; }
};

C10_HOST_DEVICE inline SequenceRows sequence_rows(const ShortConvShape& s, int64_t b, int64_t g) {
  return {(b * s.T * s.G + g) * s.D, s.G * s.D};
}

// r[slot] = 1 / rms of each slot's row, a warp per row (0 for rows outside the sequence).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void inv_rms_rows(const ShortConvParams& p, const scalar_t* __restrict__ x,
                                             const SequenceRows& rows, const RowSlots& slots, int64_t count, acc_t* r) {
  const int lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t s = threadIdx.x / kWarpSize; s < count; s += warps) {
    const int64_t t = slots.row(s);
    const bool inside = t >= 0 && t < p.T;  // the same in the whole warp
    acc_t sum_sq = 0;
    if (inside) {
      const scalar_t* xr = x + rows.offset(t);
      for (int64_t d = lane; d < p.D; d += kWarpSize) {
        const auto v = static_cast<acc_t>(xr[d]);
        sum_sq += v * v;
      }
    }
    sum_sq = warp_sum(sum_sq);
    if (lane == 0) {
      r[s] = inside ? inv_rms<acc_t>(sum_sq, p.D, static_cast<acc_t>(p.eps)) : acc_t(0);
    }
  }
}

// z of token t at column d over the norm weight: sum over taps of tap * x * 1 / rms, zero before the
// start. m: the offset token t was placed at in `slots`.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t convolve(const ShortConvParams& p, const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ taps, const SequenceRows& rows,
                                          const RowSlots& slots, const acc_t* r, int64_t t, int64_t m, int64_t d) {
  acc_t z = 0;
  for (int64_t j = 0; j < p.K && t - j * p.dilation >= 0; ++j) {
    const int64_t src = t - j * p.dilation;
    z += taps[(p.K - 1 - j) * p.D + d] * static_cast<acc_t>(x[rows.offset(src) + d]) * r[slots.slot(src, m - j)];
  }
  return z;
}

template <typename scalar_t, bool kResidual>
__global__ void __launch_bounds__(kShortConvThreads)
    short_conv_forward_kernel(const ShortConvParams p, const ShortConvLayout L) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* __restrict__ x = static_cast<const scalar_t*>(p.x);
  auto* __restrict__ y = static_cast<scalar_t*>(p.out);
  acc_t* r = shared_memory<acc_t>();
  const int64_t work = p.B * p.G * L.tiles;
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t seq = w / L.tiles, b = seq / p.G, g = seq % p.G;
    const int64_t t0 = w % L.tiles * L.tile, t1 = std::min(t0 + L.tile, p.T);
    const SequenceRows rows = sequence_rows(p, b, g);
    const RowSlots slots{t0, L.tile, p.dilation, -(p.K - 1), L.dense};
    const acc_t* __restrict__ taps = static_cast<const acc_t*>(p.taps) + g * p.K * p.D;
    const acc_t* __restrict__ norm = static_cast<const acc_t*>(p.norm) + g * p.D;
    inv_rms_rows(p, x, rows, slots, L.r_slots, r);
    __syncthreads();
    for (int64_t d = threadIdx.x; d < p.D; d += kShortConvThreads) {
      const acc_t nw = norm[d];
      for (int64_t t = t0; t < t1; ++t) {
        acc_t out = silu(nw * convolve(p, x, taps, rows, slots, r, t, 0, d));
        if constexpr (kResidual) {
          out += static_cast<acc_t>(x[rows.offset(t) + d]);
        }
        y[rows.offset(t) + d] = static_cast<scalar_t>(out);
      }
    }
    __syncthreads();  // the next tile's 1 / rms overwrites this one's
  }
}

// What the backward's sweeps over one tile share.
template <typename scalar_t>
struct BackwardTile {
  using acc_t = at::opmath_type<scalar_t>;
  const ShortConvParams& p;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ gy;
  const acc_t* __restrict__ taps;
  SequenceRows rows;
  RowSlots r_slots, gz_slots;
  const acc_t* r;  // 1 / rms by r_slots
  acc_t* gz;       // [gz slot, thread]: this thread's column
  int64_t t0, t1;

  __device__ __forceinline__ acc_t inv_rms_of(int64_t t) const { return r[r_slots.slot(t, 0)]; }
  __device__ __forceinline__ acc_t& gz_at(int64_t slot) const { return gz[slot * blockDim.x + threadIdx.x]; }

  // gz of every token [t0, t1 + context) at column d (zero past the end: no output there).
  __device__ __forceinline__ void stage_gz(int64_t count, acc_t nw, int64_t d) const {
    for (int64_t s = 0; s < count; ++s) {
      const int64_t t = gz_slots.row(s);
      acc_t v = 0;
      if (t < p.T) {
        const acc_t z = nw * convolve(p, x, taps, rows, r_slots, r, t, gz_slots.offset(s), d);
        v = static_cast<acc_t>(gy[rows.offset(t) + d]) * silu_grad(z);
      }
      gz_at(s) = v;
    }
  }

  // The gradient of xn at token q, column d: sum over taps i of tap_i * gz_{q + (K - 1 - i) * dilation}.
  __device__ __forceinline__ acc_t grad_xn(int64_t q, int64_t d) const {
    acc_t gxn = 0;
    for (int64_t j = 0; j < p.K; ++j) {
      gxn += taps[(p.K - 1 - j) * p.D + d] * gz_at(gz_slots.slot(q + j * p.dilation, j));
    }
    return gxn;
  }
};

template <typename scalar_t, bool kResidual>
__global__ void __launch_bounds__(kShortConvThreads, kShortConvBackwardMinBlocks)
    short_conv_backward_kernel(const ShortConvParams p, const ShortConvLayout L) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* smem = shared_memory<acc_t>();
  acc_t* coef = smem + L.coef;  // [tile]: sum(gxn * nw * x) * r^3 / D of each token
  acc_t* dot = smem + L.dot;    // [tile, threads]: each thread's part of that sum
  const int nt = blockDim.x, tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t seq = blockIdx.x / L.splits, split = blockIdx.x % L.splits, b = seq / p.G, g = seq % p.G;
  const acc_t* __restrict__ norm = static_cast<const acc_t*>(p.norm) + g * p.D;
  auto* __restrict__ gx = static_cast<scalar_t*>(p.out);
  // This block's [K + 1, D] in partial row b * splits + split: each tap's gradient, then the norm weight's.
  acc_t* __restrict__ part = static_cast<acc_t*>(p.partials) + ((b * L.splits + split) * p.G + g) * (p.K + 1) * p.D;
  BackwardTile<scalar_t> tile{p,
                              static_cast<const scalar_t*>(p.x),
                              static_cast<const scalar_t*>(p.grad_y),
                              static_cast<const acc_t*>(p.taps) + g * p.K * p.D,
                              sequence_rows(p, b, g),
                              {},
                              {},
                              smem,
                              smem + L.gz,
                              0,
                              0};
  // The sequence's tiles split into L.splits ranges that differ by at most one.
  const int64_t per = L.tiles / L.splits, extra = L.tiles % L.splits;
  const int64_t tile_begin = split * per + std::min(split, extra);
  const int64_t tile_end = tile_begin + per + (split < extra ? 1 : 0);

  for (int64_t d = tid; d < p.D; d += nt) {
    for (int64_t i = 0; i <= p.K; ++i) {
      part[i * p.D + d] = acc_t(0);
    }
  }
  for (int64_t k = tile_begin; k < tile_end; ++k) {
    tile.t0 = k * L.tile;
    tile.t1 = std::min(tile.t0 + L.tile, p.T);
    tile.r_slots = {tile.t0, L.tile, p.dilation, -(p.K - 1), L.dense};
    tile.gz_slots = {tile.t0, L.tile, p.dilation, 0, L.dense};
    inv_rms_rows(p, tile.x, tile.rows, tile.r_slots, L.r_slots, smem);
    for (int64_t q = 0; q < L.tile; ++q) {
      dot[q * nt + tid] = acc_t(0);
    }
    __syncthreads();

    // Pass 1: the weight gradients and this thread's parts of the row sums.
    for (int64_t d = tid; d < p.D; d += nt) {
      const acc_t nw = norm[d];
      tile.stage_gz(L.gz_slots, nw, d);
      for (int64_t j = 0; j < p.K; ++j) {
        acc_t sum = 0;
        for (int64_t q = tile.t0; q < tile.t1 && q + j * p.dilation < p.T; ++q) {
          const acc_t xr = static_cast<acc_t>(tile.x[tile.rows.offset(q) + d]) * tile.inv_rms_of(q);
          sum += tile.gz_at(tile.gz_slots.slot(q + j * p.dilation, j)) * xr;
        }
        part[(p.K - 1 - j) * p.D + d] += sum * nw;
      }
      acc_t gnorm = 0;
      for (int64_t q = tile.t0; q < tile.t1; ++q) {
        const acc_t gxn = tile.grad_xn(q, d);
        const auto xv = static_cast<acc_t>(tile.x[tile.rows.offset(q) + d]);
        gnorm += gxn * xv * tile.inv_rms_of(q);
        dot[(q - tile.t0) * nt + tid] += gxn * nw * xv;
      }
      part[p.K * p.D + d] += gnorm;
    }
    __syncthreads();

    // Each token's row sum, by one warp in a fixed order, into its RMSNorm-backward coefficient.
    for (int64_t q = warp; q < tile.t1 - tile.t0; q += nt / kWarpSize) {
      acc_t sum = 0;
      for (int j = lane; j < nt; j += kWarpSize) {
        sum += dot[q * nt + j];
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const acc_t r = tile.inv_rms_of(tile.t0 + q);
        coef[q] = sum * r * r * r / static_cast<acc_t>(p.D);
      }
    }
    __syncthreads();

    // Pass 2: dx = r * gxn * nw - x * coef (+ grad_y), gz staged again.
    for (int64_t d = tid; d < p.D; d += nt) {
      const acc_t nw = norm[d];
      tile.stage_gz(L.gz_slots, nw, d);
      for (int64_t q = tile.t0; q < tile.t1; ++q) {
        const int64_t e = tile.rows.offset(q) + d;
        acc_t dx = tile.inv_rms_of(q) * tile.grad_xn(q, d) * nw - static_cast<acc_t>(tile.x[e]) * coef[q - tile.t0];
        if constexpr (kResidual) {
          dx += static_cast<acc_t>(tile.gy[e]);
        }
        gx[e] = static_cast<scalar_t>(dx);
      }
    }
    __syncthreads();  // the next tile's 1 / rms and coefficients overwrite this one's
  }
}

// Launches the forward through `launch` (the CUDA runtime, or the tests' emulator; see run_gate_forward).
template <typename scalar_t, typename Launcher>
void run_short_conv_forward(const ShortConvParams& p, Launcher& launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const ShortConvLayout L = forward_layout<acc_t>(p);
  RA_BOOL_SWITCH(p.residual, kResidual, [&] {
    const auto kernel = short_conv_forward_kernel<scalar_t, kResidual>;
    const int64_t work = p.B * p.G * L.tiles;
    launch(kernel, std::min(work, launch.max_blocks(kernel, L.threads, L.bytes)), L.threads, L.bytes, p, L);
  });
}

// Launches the backward and the sum of its partials. `reserve(rows)` allocates the partials
// [rows, G, K + 1, D] into p.partials and returns the sums [G, K + 1, D] (acc dtype) they go to.
template <typename scalar_t, typename Launcher, typename Reserve>
void run_short_conv_backward(ShortConvParams& p, Launcher& launch, Reserve&& reserve) {
  using acc_t = at::opmath_type<scalar_t>;
  ShortConvLayout L = backward_layout<acc_t>(p, launch.smem_budget());
  acc_t* sums = nullptr;
  RA_BOOL_SWITCH(p.residual, kResidual, [&] {
    const auto kernel = short_conv_backward_kernel<scalar_t, kResidual>;
    // Blocks enough to fill the GPU, in whole sequences: a block never mixes two partial rows.
    const int64_t sequences = p.B * p.G;
    const int64_t fill = launch.max_blocks(kernel, L.threads, L.bytes);
    L.splits = std::clamp<int64_t>((fill + sequences - 1) / sequences, 1, L.tiles);
    sums = static_cast<acc_t*>(reserve(p.B * L.splits));
    launch(kernel, sequences * L.splits, L.threads, L.bytes, p, L);
  });
  reduce_partials<acc_t>(launch, static_cast<const acc_t*>(p.partials), p.B * L.splits, p.G * (p.K + 1) * p.D, sums);
}

}  // namespace retrieval_attention::cuda
