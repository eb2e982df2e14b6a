// CPU kernel of the decode step (csrc/decode_step.h): one task per (b, g) row.
//
// A task computes the row's gate as the gate's kernels do (gate_rows.h, in ComputeType), writes
// o = a * v into y's row, finds 1 / rms of o and of the K - 1 state rows the taps read, then per
// SIMD chunk of columns convolves, writes y = o + SiLU(z) over o and shifts the state's columns up
// by one row, o last. Each task reads and writes only its own (b, g) rows, so no barrier is needed.
//
// Compiled once per CPU capability (see decode_step_cpu_kernels.h); every name below lives in the
// namespace CPU_CAPABILITY expands to. No std:: container of a plain type (see gate_kernel.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include "common/gate_math.h"
#include "common/static_switch.h"
#include "cpu/decode_step_cpu_kernels.h"
#include "cpu/kernels/gate_rows.h"
#include "cpu/kernels/lanes.h"

#include <algorithm>
#include <cstring>

#ifndef CPU_CAPABILITY
#error "decode_step_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

// Elements of work per at::parallel_for task: a batch of one runs its G rows on one thread.
constexpr int64_t kGrainElements = 1 << 15;

// 1 / rms of a row of D, its squares summed lane by lane (as the short convolution's kernel).
template <typename scalar_t>
at::opmath_type<scalar_t> row_inv_rms(const scalar_t* x, int64_t D, double eps) {
  using L = Lanes<scalar_t>;
  typename L::Chunk sq = L::splat(0);
  for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t n) {
    const auto v = L::load(x + d, n);
    for (const auto i : c10::irange(L::kVecs)) {
      sq[i] = at::vec::fmadd(v[i], v[i], sq[i]);
    }
  });
  using acc_t = typename L::acc_t;
  return inv_rms<acc_t>(L::sum(sq), D, static_cast<acc_t>(eps));
}

template <typename scalar_t, bool kHasWeight>
void step(const DecodeStepCpuParams& p) {
  using GL = RowLanes<scalar_t>;  // the gate's compute type
  using gacc_t = typename GL::acc_t;
  using L = Lanes<scalar_t>;  // the short convolution's
  using acc_t = typename L::acc_t;
  using Vec = typename L::AccVec;
  const GateForwardParams& gp = p.gate;
  const GateForwardPointers<scalar_t, gacc_t> ptr(gp);
  auto* state = static_cast<scalar_t*>(p.state);
  const int64_t G = gp.G, D = gp.D, K = p.K, ctx = p.context();
  const auto clamp = static_cast<gacc_t>(gp.options.sqrt_clamp);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / ((K + ctx + 3) * D));

  at::parallel_for(0, gp.N * G, grain, [&](int64_t begin, int64_t end) {
    auto* r = static_cast<acc_t*>(p.scratch) + at::get_thread_num() * p.scratch_per_thread;  // [K], by tap
    for (const auto row : c10::irange(begin, end)) {
      const int64_t b = row / G, g = row % G;
      const scalar_t* hr = ptr.h + b * gp.h_stride_n + g * gp.h_stride_g;
      const scalar_t* kr = ptr.k + b * gp.k_stride_n + g * gp.k_stride_g;
      const scalar_t* vr = ptr.v + b * gp.v_stride_n;
      const auto sums = row_sums<scalar_t, kHasWeight>(hr, kr, kHasWeight ? ptr.w + g * D : nullptr, D);
      const auto st = row_stats<gacc_t>(sums, D, static_cast<gacc_t>(gp.eps), static_cast<gacc_t>(gp.scale));
      const gacc_t a = gate_value<gacc_t>(st.s, gp.options.signed_sqrt, clamp, true);
      ptr.a[row] = static_cast<at::opmath_type<scalar_t>>(a);

      // o = a * v, rounded to scalar_t as the gate's output is, kept in y's row until y overwrites it.
      scalar_t* yr = ptr.o + row * D;
      const typename GL::AccVec av(a);
      for_each_chunk<GL::kWidth>(D, [&](int64_t d, int64_t n) {
        auto o = GL::load(vr + d, n);
        for (const auto i : c10::irange(GL::kVecs)) {
          o[i] = av * o[i];
        }
        GL::store(yr + d, o, n);
      });

      // Tap k reads the token (K - 1 - k) * dilation before the new one: a state row, or o for the last tap.
      const auto tap_row = [&](int64_t k) -> scalar_t* {
        return k == K - 1 ? yr : state + p.state_offset(b, g, p.state_row(K - 1 - k), 0);
      };
      for (const auto k : c10::irange(K)) {
        r[k] = row_inv_rms(tap_row(k), D, p.conv_eps);
      }
      const auto* taps = static_cast<const acc_t*>(p.taps) + g * K * D;
      const auto* norm = static_cast<const acc_t*>(p.norm) + g * D;
      for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t n) {
        const auto nv = L::load_acc(norm + d, n);
        typename L::Chunk z = L::splat(0);
        for (const auto k : c10::irange(K)) {
          const auto xv = L::load(tap_row(k) + d, n);
          const auto tv = L::load_acc(taps + k * D + d, n);
          for (const auto i : c10::irange(L::kVecs)) {
            z[i] = at::vec::fmadd(tv[i], xv[i] * Vec(r[k]) * nv[i], z[i]);
          }
        }
        // The state's columns [d, d + n) up by one row, o into the last: every read of them is done.
        for (int64_t j = 0; j < ctx; ++j) {
          const scalar_t* src = j + 1 < ctx ? state + p.state_offset(b, g, j + 1, d) : yr + d;
          std::memcpy(state + p.state_offset(b, g, j, d), src, n * sizeof(scalar_t));
        }
        const auto ov = L::load(yr + d, n);
        for (const auto i : c10::irange(L::kVecs)) {
          z[i] = silu_vec<false>(z[i]) + ov[i];
        }
        L::store(yr + d, z, n);
      });
    }
  });
}

void decode_step(const DecodeStepCpuParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "decode_step", [&] {
    RA_BOOL_SWITCH(p.gate.w != nullptr, kHasWeight, [&] { step<scalar_t, kHasWeight>(p); });
  });
}

}  // namespace

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

DecodeStepKernels decode_step_kernels() { return {&decode_step, RA_STRINGIFY(CPU_CAPABILITY)}; }

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
