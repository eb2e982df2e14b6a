// CPU kernels of the gate: one SIMD pass per row for the statistics, one for the output;
// the backward in two passes per token (dL/da, then every gradient at once).
//
// Compiled once per CPU capability (see gate_cpu_kernels.h); every name below lives in
// the namespace CPU_CAPABILITY expands to. Only raw pointers cross this file's boundary.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include "common/gate_math.h"
#include "common/static_switch.h"
#include "cpu/gate_cpu_kernels.h"
#include "cpu/kernels/gate_rows.h"
#include "cpu/kernels/lanes.h"

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

// No std:: container of a plain type (std::vector<float>) may be instantiated here: its
// out-of-line copies would be compiled with this capability's instructions and the linker
// could keep them for every caller. Scratch memory comes from the host (tests/test_build.py).

#ifndef CPU_CAPABILITY
#error "gate_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Rows of work per at::parallel_for task in the forward: enough elements to amortize a task.
constexpr int64_t kForwardGrainElements = 1 << 15;

// Tokens whose rows the backward's second pass walks together, column chunk by column chunk,
// so the weight and its gradient partial are loaded and stored once per block, not per token.
// It pays for float16/bfloat16 only: float32 rows are twice the bytes, and four tokens' streams
// then cost more than the partial's traffic saves (N=2048, G=4, D=1024: 6.8 -> 5.9 ms bfloat16,
// 7.3 -> 8.2 ms float32).
template <typename scalar_t>
constexpr int64_t kTokenBlock = Lanes<scalar_t>::kReduced ? 4 : 1;

// The host allocates the product weight in compute_dtype, which must name ComputeType.
template <typename scalar_t>
constexpr bool kComputeDtypeAgrees =
    compute_dtype(c10::CppTypeToScalarType<scalar_t>::value) == c10::CppTypeToScalarType<ComputeType<scalar_t>>::value;
static_assert(kComputeDtypeAgrees<float> && kComputeDtypeAgrees<double> && kComputeDtypeAgrees<at::Half> &&
              kComputeDtypeAgrees<at::BFloat16>);

// The statistics and the gate of one row, from h and k.
template <typename acc_t>
struct RowGate {
  RowStats<acc_t> st;
  acc_t a;
};

template <typename scalar_t, bool kHasWeight>
RowGate<ComputeType<scalar_t>> row_gate(const GateRowParams& p,
                                        const GateRowPointers<scalar_t, ComputeType<scalar_t>>& ptr, int64_t n,
                                        int64_t g) {
  using acc_t = ComputeType<scalar_t>;
  const scalar_t* hr = ptr.h + n * p.h_stride_n + g * p.h_stride_g;
  const scalar_t* kr = ptr.k + n * p.k_stride_n + g * p.k_stride_g;
  const auto sums = row_sums<scalar_t, kHasWeight>(hr, kr, kHasWeight ? ptr.w + g * p.D : nullptr, p.D);
  const auto st = row_stats<acc_t>(sums, p.D, static_cast<acc_t>(p.eps), static_cast<acc_t>(p.scale));
  const bool keep = p.mask == nullptr || p.mask[n];
  return {st, gate_value<acc_t>(st.s, p.options.signed_sqrt, static_cast<acc_t>(p.options.sqrt_clamp), keep)};
}

// float32 rows recompute their statistics in the backward: the saved float32 ones cost up to ~4 ulps.
template <typename scalar_t>
constexpr bool kRecomputeStats = !std::is_same_v<ComputeType<scalar_t>, at::opmath_type<scalar_t>>;

template <typename scalar_t, bool kHasWeight, bool kResidual>
void forward_impl(const GateForwardParams& p) {
  using L = RowLanes<scalar_t>;
  using saved_t = at::opmath_type<scalar_t>;
  const int64_t G = p.G, D = p.D, NG = p.N * p.G;
  const GateForwardPointers<scalar_t, typename L::acc_t> ptr(p);

  const int64_t grain = std::max<int64_t>(1, kForwardGrainElements / (G * D));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    for (const auto n : c10::irange(begin, end)) {
      const scalar_t* vn = ptr.v + n * p.v_stride_n;
      for (const auto g : c10::irange(G)) {
        const scalar_t* hr = ptr.h + n * p.h_stride_n + g * p.h_stride_g;
        const auto [st, a] = row_gate<scalar_t, kHasWeight>(p, ptr, n, g);
        const int64_t row = n * G + g;
        ptr.a[row] = static_cast<saved_t>(a);
        if (ptr.stats != nullptr) {
          store_stats(ptr.stats, NG, row, cast_stats<saved_t>(st));
        }

        scalar_t* orow = ptr.o + row * D;
        const typename L::AccVec av(a);
        for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t cnt) {
          auto out = L::load(vn + d, cnt);
          [[maybe_unused]] typename L::Chunk hv;
          if constexpr (kResidual) {
            hv = L::load(hr + d, cnt);
          }
          for (const auto i : c10::irange(L::kVecs)) {
            out[i] = av * out[i];
            if constexpr (kResidual) {
              out[i] = hv[i] + out[i];
            }
          }
          L::store(orow + d, out, cnt);
        });
      }
    }
  });
}

// dL/da of one row: sum_d(go * v), plus the gradient that reaches a directly.
template <typename scalar_t>
ComputeType<scalar_t> row_dot(const scalar_t* x, const scalar_t* y, int64_t D) {
  using L = RowLanes<scalar_t>;
  typename L::Chunk acc = L::splat(0);
  for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t n) {
    const auto xv = L::load(x + d, n);
    const auto yv = L::load(y + d, n);
    for (const auto i : c10::irange(L::kVecs)) {
      acc[i] = at::vec::fmadd(xv[i], yv[i], acc[i]);
    }
  });
  return L::sum(acc);
}

template <typename acc_t>
struct RowBackward {
  RowGradCoeffs<acc_t> c;
  acc_t a;
};

template <typename scalar_t, bool kHasWeight, bool kResidual>
void backward_impl(const GateBackwardParams& p) {
  using L = RowLanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Chunk = typename L::Chunk;
  const int64_t N = p.N, G = p.G, D = p.D, NG = p.N * p.G;
  const GateBackwardPointers<scalar_t, acc_t> ptr(p);
  const auto scale = static_cast<acc_t>(p.scale);
  const auto clamp = static_cast<acc_t>(p.options.sqrt_clamp);

  const int64_t num_chunks = weight_grad_chunks(N);
  const int64_t tokens_per_chunk = (N + num_chunks - 1) / num_chunks;
  auto* partials = ptr.grad_w_partials;
  TORCH_INTERNAL_ASSERT(!kHasWeight || (partials != nullptr && p.num_partials == num_chunks));

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<RowBackward<acc_t>> rows(kTokenBlock<scalar_t> * G);
    for (const auto chunk : c10::irange(chunk_begin, chunk_end)) {
      acc_t* dw_part = kHasWeight ? partials + chunk * G * D : nullptr;
      if constexpr (kHasWeight) {
        for (const auto i : c10::irange(G * D)) {
          dw_part[i] = acc_t(0);
        }
      }
      const int64_t n_end = std::min(N, (chunk + 1) * tokens_per_chunk);
      for (int64_t n0 = chunk * tokens_per_chunk; n0 < n_end; n0 += kTokenBlock<scalar_t>) {
        const int64_t tokens = std::min(kTokenBlock<scalar_t>, n_end - n0);
        // Pass 1: dL/da and the coefficients of every row of the token block.
        for (const auto t : c10::irange(tokens)) {
          const int64_t n = n0 + t;
          const bool keep = p.mask == nullptr || p.mask[n];
          for (const auto g : c10::irange(G)) {
            const int64_t row = n * G + g;
            const auto [st, a] = kRecomputeStats<scalar_t>
                                     ? row_gate<scalar_t, kHasWeight>(p, ptr, n, g)
                                     : RowGate<acc_t>{cast_stats<acc_t>(load_stats(ptr.stats, NG, row)), ptr.a[row]};
            acc_t da = row_dot(ptr.grad_o + n * p.go_stride_n + g * p.go_stride_g, ptr.v + n * p.v_stride_n, D);
            if constexpr (!kRecomputeStats<scalar_t>) {
              // Pass 2 walks the block's rows of h and k side by side, more streams than the hardware follows.
              prefetch_row(ptr.h + n * p.h_stride_n + g * p.h_stride_g, D);
              prefetch_row(ptr.k + n * p.k_stride_n + g * p.k_stride_g, D);
            }
            if (ptr.grad_a != nullptr) {
              da += ptr.grad_a[row];
            }
            const acc_t ds = score_grad<acc_t>(da, a, st.s, p.options.signed_sqrt, clamp, keep);
            rows[t * G + g] = {row_grad_coeffs<acc_t>(st, ds, scale, D), a};
          }
        }

        // Pass 2: every gradient; the weight-gradient partial is read and written once per block.
        for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t cnt) {
          std::array<Chunk, kTokenBlock<scalar_t>> dv_acc;
          dv_acc.fill(L::splat(0));
          for (const auto g : c10::irange(G)) {
            [[maybe_unused]] Chunk wv, dwv;
            if constexpr (kHasWeight) {
              wv = L::load_acc(ptr.w + g * D + d, cnt);
              dwv = L::load_acc(dw_part + g * D + d, cnt);
            }
            for (const auto t : c10::irange(tokens)) {
              const int64_t n = n0 + t;
              const auto& rb = rows[t * G + g];
              const auto gov = L::load(ptr.grad_o + n * p.go_stride_n + g * p.go_stride_g + d, cnt);
              const auto hv = L::load(ptr.h + n * p.h_stride_n + g * p.h_stride_g + d, cnt);
              const auto kv = L::load(ptr.k + n * p.k_stride_n + g * p.k_stride_g + d, cnt);
              Chunk dhv, dkv;
              const typename L::AccVec cross(rb.c.cross), self_q(rb.c.self_q), self_k(rb.c.self_k), av(rb.a);
              for (const auto i : c10::irange(L::kVecs)) {
                const auto kw = kHasWeight ? kv[i] * wv[i] : kv[i];
                const auto hw = kHasWeight ? hv[i] * wv[i] : hv[i];
                dhv[i] = cross * kw - self_q * hv[i];
                dkv[i] = cross * hw - self_k * kv[i];
                if constexpr (kResidual) {
                  dhv[i] = dhv[i] + gov[i];
                }
                if constexpr (kHasWeight) {
                  dwv[i] = at::vec::fmadd(cross * hv[i], kv[i], dwv[i]);
                }
                dv_acc[t][i] = at::vec::fmadd(av, gov[i], dv_acc[t][i]);
              }
              const int64_t out = (n * G + g) * D + d;
              L::stream(ptr.grad_h + out, dhv, cnt);
              L::stream(ptr.grad_k + out, dkv, cnt);
            }
            if constexpr (kHasWeight) {
              L::store_acc(dw_part + g * D + d, dwv, cnt);
            }
          }
          for (const auto t : c10::irange(tokens)) {
            L::stream(ptr.grad_v + (n0 + t) * D + d, dv_acc[t], cnt);
          }
        });
      }
    }
    stream_fence();
  });

  if constexpr (kHasWeight) {
    auto* grad_w = ptr.grad_w;
    const int64_t GD = G * D;
    at::parallel_for(0, GD, 1 << 12, [&](int64_t begin, int64_t end) {
      for (const auto i : c10::irange(begin, end)) {
        acc_t total = 0;
        for (const auto chunk : c10::irange(num_chunks)) {
          total += partials[chunk * GD + i];
        }
        grad_w[i] = total;
      }
    });
  }
}

void gate_forward(const GateForwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "retrieval_attention::gate (CPU)", [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] { forward_impl<scalar_t, kHasWeight, kResidual>(p); });
    });
  });
}

void gate_backward(const GateBackwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "retrieval_attention::gate_backward (CPU)", [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] { backward_impl<scalar_t, kHasWeight, kResidual>(p); });
    });
  });
}

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

}  // namespace

GateKernels gate_kernels() { return {&gate_forward, &gate_backward, RA_STRINGIFY(CPU_CAPABILITY)}; }

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
