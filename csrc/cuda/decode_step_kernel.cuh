// The decode step's CUDA kernel and its launch plan (csrc/decode_step.h), shared by decode_step.cu and
// the C++ tests' emulator.
//
// It reads the parameters as given (DecodeStepWeights::kRaw): the step is one launch, with nothing converted
// before it. One block per (b, g) row, grid-strided over rows. A warp per state row finds 1 / rms of the K - 1
// state rows the taps read while every thread sums the gate's h^2, k^2 and h * k * w over its columns;
// one block sum gives the gate a (the gate's own row math, gate_math.h); a second gives 1 / rms of
// o = a * v (rounded to the dtype of h, as the gate writes it). Then each thread owns columns: it
// convolves, writes y = o + SiLU(z) and shifts its columns of the state up by one row, o last. No
// atomics; the state rows of a (b, g) row are touched by its block alone.
#pragma once

#include <ATen/OpMathType.h>

#include "common/decode_step_params.h"
#include "common/gate_math.h"
#include "common/short_conv_math.h"
#include "common/static_switch.h"
#include "cuda/device_utils.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / kWarpSize;
constexpr int kDecodeGateSums = 3;                                      // h^2, k^2, h*k*w
constexpr int64_t kDecodeScratch = 2 * kDecodeGateSums * kDecodeWarps;  // the gate's block sum, then o's

// Shared memory: the two block sums' scratch, then 1 / rms of each tap's row.
template <typename acc_t>
size_t decode_step_shared_bytes(const DecodeStepParams& p) {
  return static_cast<size_t>(kDecodeScratch + p.K) * sizeof(acc_t);
}

// Element i of a parameter as given, float32 or scalar_t (the flag is the same for the whole grid), in acc_t:
// what the CPU's prepared copies hold, without a conversion kernel before this one.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t param_at(const void* p, bool is_float, int64_t i) {
  return is_float ? static_cast<acc_t>(static_cast<const float*>(p)[i])
                  : static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
}

template <typename scalar_t, bool kHasWeight>
__global__ void __launch_bounds__(kDecodeThreads) decode_step_kernel(const DecodeStepParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  const GateForwardParams& gp = p.gate;
  const GateForwardPointers<scalar_t> ptr(gp);
  auto* __restrict__ state = static_cast<scalar_t*>(p.state);
  acc_t* smem = shared_memory<acc_t>();
  acc_t* r = smem + kDecodeScratch;  // [K] by tap; the last tap's (o's) stays in a register
  const int64_t G = gp.G, D = gp.D, K = p.K, ctx = p.context(), rows = gp.N * gp.G;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const auto conv_eps = static_cast<acc_t>(p.conv_eps);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / G, g = row % G;
    // Tap k reads the state row of the token (K - 1 - k) * dilation before the new one.
    const auto state_at = [&](int64_t k, int64_t d) { return p.state_offset(b, g, p.state_row(K - 1 - k), d); };
    for (int64_t k = warp; k < K - 1; k += kDecodeWarps) {
      acc_t sq = 0;
      for (int64_t d = lane; d < D; d += kWarpSize) {
        const auto x = static_cast<acc_t>(state[state_at(k, d)]);
        sq += x * x;
      }
      sq = warp_sum(sq);
      if (lane == 0) {
        r[k] = inv_rms<acc_t>(sq, D, conv_eps);
      }
    }

    const scalar_t* hr = ptr.h + b * gp.h_stride_n + g * gp.h_stride_g;
    const scalar_t* kr = ptr.k + b * gp.k_stride_n + g * gp.k_stride_g;
    const scalar_t* vr = ptr.v + b * gp.v_stride_n;
    // w_q * w_k in acc_t, as the gate's host code multiplies them (one of them alone when the other is none).
    const auto product_weight = [&](int64_t i) {
      const acc_t q = p.w_q != nullptr ? param_at<scalar_t, acc_t>(p.w_q, p.w_q_float, i) : acc_t(1);
      return p.w_k != nullptr ? (p.w_q != nullptr ? q * param_at<scalar_t, acc_t>(p.w_k, p.w_k_float, i)
                                                  : param_at<scalar_t, acc_t>(p.w_k, p.w_k_float, i))
                              : q;
    };
    acc_t sums[kDecodeGateSums] = {0, 0, 0};
    for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
      const auto x = static_cast<acc_t>(hr[d]);
      const auto y = static_cast<acc_t>(kr[d]);
      sums[0] += x * x;
      sums[1] += y * y;
      if constexpr (kHasWeight) {
        sums[2] += x * product_weight(g * D + d) * y;
      } else {
        sums[2] += x * y;
      }
    }
    block_sum<kDecodeThreads>(sums, smem);  // its barrier also publishes r
    const RowSums<acc_t> row_sums{sums[0], sums[1], sums[2]};
    const auto st = row_stats<acc_t>(row_sums, D, static_cast<acc_t>(gp.eps), static_cast<acc_t>(gp.scale));
    const acc_t a = gate_value<acc_t>(st.s, gp.options.signed_sqrt, static_cast<acc_t>(gp.options.sqrt_clamp), true);
    if (threadIdx.x == 0) {
      ptr.a[row] = a;
    }

    // o as the gate writes it; recomputed per pass rather than kept (a thread's columns vary with D).
    const auto o_at = [&](int64_t d) { return static_cast<scalar_t>(a * static_cast<acc_t>(vr[d])); };
    acc_t o_sq[1] = {0};
    for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
      const auto o = static_cast<acc_t>(o_at(d));
      o_sq[0] += o * o;
    }
    block_sum<kDecodeThreads>(o_sq, smem + kDecodeGateSums * kDecodeWarps);
    const acc_t r_o = inv_rms<acc_t>(o_sq[0], D, conv_eps);

    // Tap k of channel g * D + d, in conv_weight's [G * D, 1, K] layout.
    const auto tap = [&](int64_t k, int64_t d) {
      return param_at<scalar_t, acc_t>(p.conv_weight, p.conv_weight_float, (g * D + d) * K + k);
    };
    for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
      const scalar_t o = o_at(d);
      acc_t z = 0;
      for (int64_t k = 0; k < K - 1; ++k) {
        z += tap(k, d) * static_cast<acc_t>(state[state_at(k, d)]) * r[k];
      }
      z += tap(K - 1, d) * static_cast<acc_t>(o) * r_o;
      // The state's column d up by one row, o into the last: this thread alone reads and writes it.
      for (int64_t j = 0; j + 1 < ctx; ++j) {
        state[p.state_offset(b, g, j, d)] = state[p.state_offset(b, g, j + 1, d)];
      }
      if (ctx > 0) {
        state[p.state_offset(b, g, ctx - 1, d)] = o;
      }
      const acc_t nw = param_at<scalar_t, acc_t>(p.conv_norm, p.conv_norm_float, g * D + d);
      ptr.o[row * D + d] = static_cast<scalar_t>(static_cast<acc_t>(o) + silu(nw * z));
    }
    __syncthreads();  // the next row's 1 / rms and block sums overwrite this one's
  }
}

// Chooses the kernel and its grid, and launches it through `launch` (the CUDA runtime, or the tests'
// emulator): launch.max_blocks(kernel, threads, bytes) and launch(kernel, grid, threads, bytes, args...).
template <typename scalar_t, typename Launcher>
void run_decode_step(const DecodeStepParams& p, Launcher& launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t bytes = decode_step_shared_bytes<acc_t>(p);
  RA_BOOL_SWITCH(p.w_q != nullptr || p.w_k != nullptr, kHasWeight, [&] {
    const auto kernel = decode_step_kernel<scalar_t, kHasWeight>;
    const int64_t rows = p.gate.N * p.gate.G;
    const int64_t grid = std::min(rows, launch.max_blocks(kernel, kDecodeThreads, bytes));
    launch(kernel, grid, kDecodeThreads, bytes, p);
  });
}

}  // namespace retrieval_attention::cuda
