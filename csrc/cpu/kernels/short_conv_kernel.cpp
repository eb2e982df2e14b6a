// CPU kernels of the short convolution (docs/block.md).
//
// One task per (b, g) sequence, which sweeps t upward. Both directions read x (and grad_y) once and
// write their outputs once. The left context is a ring of the last (K - 1) * dilation + 1
// normalized rows, not a padded copy. The backward finishes position q = t - context at step t,
// once every gz it needs is known, and adds that sequence's weight gradients to its own partial
// row (the host sums them over b in order, so no result depends on the thread count).
//
// Compiled once per CPU capability (see short_conv_cpu_kernels.h); every name below lives in the
// namespace CPU_CAPABILITY expands to. Only raw pointers cross this file's boundary, and no std::
// container of a plain type is instantiated here (see gate_kernel.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include "common/gate_math.h"
#include "cpu/kernels/lanes.h"
#include "cpu/short_conv_cpu_kernels.h"

#include <algorithm>

#ifndef CPU_CAPABILITY
#error "short_conv_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

// One thread's scratch: the normalized rows and the gz rows of the context, 1 / rms, a row, and
// the weight gradients of the sequence at hand (K tap rows, then the norm's); rows `pitch` apart.
template <typename acc_t>
struct Scratch {
  Scratch(const ShortConvCpuParams& p, acc_t* base)
      : rows(p.context() + 1),
        pitch(short_conv_scratch_pitch(p.D)),
        xn(base),
        gz(xn + rows * pitch),
        r(gz + rows * pitch),
        gxn(r + rows),
        gw(gxn + pitch) {}
  acc_t* xn_row(int64_t t) const { return xn + (t % rows) * pitch; }
  acc_t* gz_row(int64_t t) const { return gz + (t % rows) * pitch; }
  acc_t& inv_rms(int64_t t) const { return r[t % rows]; }
  acc_t* gw_row(int64_t k) const { return gw + k * pitch; }
  int64_t rows, pitch;
  acc_t *xn, *gz, *r, *gxn, *gw;
};

template <typename acc_t>
Scratch<acc_t> thread_scratch(const ShortConvCpuParams& p) {
  return Scratch<acc_t>(p, static_cast<acc_t*>(p.scratch) + at::get_thread_num() * p.scratch_per_thread);
}

// One (b, g) sequence: its branch's parameters and where its rows are.
template <typename acc_t>
struct Sequence {
  Sequence(const ShortConvCpuParams& p, int64_t task)
      : b(task / p.G),
        g(task % p.G),
        taps(static_cast<const acc_t*>(p.taps) + g * p.K * p.D),
        norm(static_cast<const acc_t*>(p.norm) + g * p.D),
        T(p.T),
        G(p.G),
        D(p.D) {}
  int64_t offset(int64_t t) const { return ((b * T + t) * G + g) * D; }
  int64_t b, g;
  const acc_t* taps;
  const acc_t* norm;
  int64_t T, G, D;
};

// fn(scratch, sequence, task) for every sequence, in parallel, each thread on its own scratch.
template <typename acc_t, typename Fn>
void for_each_sequence(const ShortConvCpuParams& p, const Fn& fn) {
  at::parallel_for(0, p.B * p.G, 1, [&](int64_t begin, int64_t end) {
    const auto s = thread_scratch<acc_t>(p);
    for (int64_t task = begin; task < end; ++task) {
      fn(s, Sequence<acc_t>(p, task), task);
    }
  });
}

// The row math of one sequence on SIMD chunks of columns [d, d + n).
template <typename scalar_t>
struct ConvRows {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::AccVec;
  using Chunk = typename L::Chunk;

  const ShortConvCpuParams& p;
  const Scratch<acc_t>& s;
  const Sequence<acc_t>& seq;

  // 1 / rms of row t, its squares summed lane by lane, kept in the ring.
  acc_t normalize_stat(const scalar_t* x, int64_t t) const {
    Chunk sq = L::splat(0);
    for_each_chunk<L::kWidth>(p.D, [&](int64_t d, int64_t n) {
      const auto v = L::load(x + d, n);
      for (const auto i : c10::irange(L::kVecs)) {
        sq[i] = at::vec::fmadd(v[i], v[i], sq[i]);
      }
    });
    const acc_t r = inv_rms<acc_t>(L::sum(sq), p.D, static_cast<acc_t>(p.eps));
    s.inv_rms(t) = r;
    return r;
  }

  // xn_t = x_t * r * norm into the ring, then z_t = sum over taps i of taps[i] * xn_{t - (K - 1 - i) * dilation}.
  Chunk convolve(const Chunk& xv, acc_t r, int64_t t, int64_t d, int64_t n) const {
    const auto nv = L::load_acc(seq.norm + d, n);
    Chunk xn;
    for (const auto i : c10::irange(L::kVecs)) {
      xn[i] = xv[i] * Vec(r) * nv[i];
    }
    L::store_acc(s.xn_row(t) + d, xn, n);
    Chunk z = L::splat(0);
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t src = t - (p.K - 1 - k) * p.dilation;
      if (src < 0) {
        continue;  // zero before the start
      }
      const auto tv = L::load_acc(seq.taps + k * p.D + d, n);
      const auto sv = L::load_acc(s.xn_row(src) + d, n);
      for (const auto i : c10::irange(L::kVecs)) {
        z[i] = at::vec::fmadd(tv[i], sv[i], z[i]);
      }
    }
    return z;
  }
};

template <typename scalar_t>
void forward(const ShortConvCpuParams& p) {
  using R = ConvRows<scalar_t>;
  using L = typename R::L;
  using acc_t = typename R::acc_t;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.out);
  for_each_sequence<acc_t>(p, [&](const Scratch<acc_t>& s, const Sequence<acc_t>& seq, int64_t) {
    const R rows{p, s, seq};
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t offset = seq.offset(t);
      if (t + 1 < p.T) {
        prefetch_row(x + seq.offset(t + 1), p.D);  // rows G * D apart: each a new page the hardware does not follow
      }
      const acc_t r = rows.normalize_stat(x + offset, t);
      for_each_chunk<L::kWidth>(p.D, [&](int64_t d, int64_t n) {
        const auto xv = L::load(x + offset + d, n);
        auto z = rows.convolve(xv, r, t, d, n);
        for (const auto i : c10::irange(L::kVecs)) {
          z[i] = silu_vec<false>(z[i]);
          if (p.residual) {
            z[i] = z[i] + xv[i];
          }
        }
        L::store(y + offset + d, z, n);
      });
    }
  });
}

template <typename scalar_t>
void backward(const ShortConvCpuParams& p) {
  using R = ConvRows<scalar_t>;
  using L = typename R::L;
  using acc_t = typename R::acc_t;
  using Vec = typename R::Vec;
  using Chunk = typename R::Chunk;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* gy = static_cast<const scalar_t*>(p.grad_y);
  auto* gx = static_cast<scalar_t*>(p.out);
  const int64_t ctx = p.context();
  for_each_sequence<acc_t>(p, [&](const Scratch<acc_t>& s, const Sequence<acc_t>& seq, int64_t task) {
    const R rows{p, s, seq};
    for (int64_t k = 0; k <= p.K; ++k) {
      std::fill_n(s.gw_row(k), p.D, acc_t(0));
    }
    acc_t* gnorm = s.gw_row(p.K);
    for (int64_t t = 0; t < p.T + ctx; ++t) {
      if (t < p.T) {
        const int64_t offset = seq.offset(t);
        if (t + 1 < p.T) {
          prefetch_row(x + seq.offset(t + 1), p.D);
          prefetch_row(gy + seq.offset(t + 1), p.D);
        }
        const acc_t r = rows.normalize_stat(x + offset, t);
        for_each_chunk<L::kWidth>(p.D, [&](int64_t d, int64_t n) {
          auto z = rows.convolve(L::load(x + offset + d, n), r, t, d, n);
          const auto gv = L::load(gy + offset + d, n);
          for (const auto i : c10::irange(L::kVecs)) {
            z[i] = gv[i] * silu_vec<true>(z[i]);
          }
          L::store_acc(s.gz_row(t) + d, z, n);
        });
      } else {
        std::fill_n(s.gz_row(t), p.D, acc_t(0));  // past the end: no output there
      }
      const int64_t q = t - ctx;  // every gz_{q + j * dilation} it needs is now known
      if (q < 0) {
        continue;
      }
      // Through the convolution: gxn_q and the taps' gradient; then the row dot RMSNorm needs.
      const int64_t offset = seq.offset(q);
      const acc_t r = s.inv_rms(q);
      Chunk dot = L::splat(0);
      for_each_chunk<L::kWidth>(p.D, [&](int64_t d, int64_t n) {
        const auto xn = L::load_acc(s.xn_row(q) + d, n);
        Chunk gxn = L::splat(0);
        for (int64_t k = 0; k < p.K; ++k) {
          const auto gz = L::load_acc(s.gz_row(q + (p.K - 1 - k) * p.dilation) + d, n);
          const auto tv = L::load_acc(seq.taps + k * p.D + d, n);
          auto gt = L::load_acc(s.gw_row(k) + d, n);
          for (const auto i : c10::irange(L::kVecs)) {
            gxn[i] = at::vec::fmadd(tv[i], gz[i], gxn[i]);
            gt[i] = at::vec::fmadd(gz[i], xn[i], gt[i]);
          }
          L::store_acc(s.gw_row(k) + d, gt, n);
        }
        const auto xv = L::load(x + offset + d, n);
        const auto nv = L::load_acc(seq.norm + d, n);
        auto gn = L::load_acc(gnorm + d, n);
        for (const auto i : c10::irange(L::kVecs)) {
          dot[i] = at::vec::fmadd(gxn[i] * nv[i], xv[i], dot[i]);
          gn[i] = at::vec::fmadd(gxn[i] * xv[i], Vec(r), gn[i]);
        }
        L::store_acc(gnorm + d, gn, n);
        L::store_acc(s.gxn + d, gxn, n);
      });
      // Through RMSNorm: dx = r * gxn * nw - x * r^3 / D * sum(gxn * nw * x).
      const Vec coef(L::sum(dot) * r * r * r / static_cast<acc_t>(p.D));
      for_each_chunk<L::kWidth>(p.D, [&](int64_t d, int64_t n) {
        const auto xv = L::load(x + offset + d, n);
        const auto gxn = L::load_acc(s.gxn + d, n);
        const auto nv = L::load_acc(seq.norm + d, n);
        [[maybe_unused]] Chunk gv;
        if (p.residual) {
          gv = L::load(gy + offset + d, n);
        }
        Chunk dx;
        for (const auto i : c10::irange(L::kVecs)) {
          dx[i] = Vec(r) * gxn[i] * nv[i] - xv[i] * coef;
          if (p.residual) {
            dx[i] = dx[i] + gv[i];
          }
        }
        L::store(gx + offset + d, dx, n);
      });
    }
    acc_t* partial = static_cast<acc_t*>(p.partials) + task * (p.K + 1) * p.D;  // [K, D], then the norm's [D]
    for (int64_t k = 0; k <= p.K; ++k) {
      std::copy_n(s.gw_row(k), p.D, partial + k * p.D);
    }
  });
}

void short_conv_forward(const ShortConvCpuParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "short_conv", [&] { forward<scalar_t>(p); });
}

void short_conv_backward(const ShortConvCpuParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "short_conv_backward",
                                  [&] { backward<scalar_t>(p); });
}

}  // namespace

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

ShortConvKernels short_conv_kernels() {
  return {&short_conv_forward, &short_conv_backward, RA_STRINGIFY(CPU_CAPABILITY)};
}

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
