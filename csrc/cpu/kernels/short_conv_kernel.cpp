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

#include "common/gate_math.h"
#include "common/short_conv_math.h"
#include "cpu/short_conv_cpu_kernels.h"

#ifndef CPU_CAPABILITY
#error "short_conv_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// One thread's scratch: the normalized rows and the gz rows of the context, 1 / rms, and two rows.
template <typename acc_t>
struct Scratch {
  Scratch(const ShortConvCpuParams& p, acc_t* base)
      : rows(p.context() + 1), D(p.D), xn(base), gz(xn + rows * D), r(gz + rows * D), z(r + rows), gxn(z + D) {}
  acc_t* xn_row(int64_t t) const { return xn + (t % rows) * D; }
  acc_t* gz_row(int64_t t) const { return gz + (t % rows) * D; }
  acc_t& inv_rms(int64_t t) const { return r[t % rows]; }
  int64_t rows, D;
  acc_t *xn, *gz, *r, *z, *gxn;
};

template <typename acc_t>
Scratch<acc_t> thread_scratch(const ShortConvCpuParams& p) {
  return Scratch<acc_t>(p, static_cast<acc_t*>(p.scratch) + at::get_thread_num() * p.scratch_per_thread);
}

// z <- SiLU(z), or z <- SiLU'(z): vectorized exp, as ATen's own silu.
template <typename acc_t, bool kGrad>
void silu_in_place(acc_t* z, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec one(acc_t(1));
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec v = Vec::loadu(z + c);
    const Vec s = one / (one + v.neg().exp());
    (kGrad ? s * (one + v * (one - s)) : v * s).store(z + c);
  }
  for (; c < n; ++c) {
    z[c] = kGrad ? silu_grad(z[c]) : silu(z[c]);
  }
}

template <typename scalar_t, typename acc_t>
void normalize(const ShortConvCpuParams& p, const scalar_t* x, const acc_t* norm, const Scratch<acc_t>& s, int64_t t) {
  acc_t sum_sq = 0;
  for (int64_t c = 0; c < p.D; ++c) {
    const auto v = static_cast<acc_t>(x[c]);
    sum_sq += v * v;
  }
  const acc_t r = inv_rms<acc_t>(sum_sq, p.D, static_cast<acc_t>(p.eps));
  s.inv_rms(t) = r;
  acc_t* __restrict__ xn = s.xn_row(t);
  for (int64_t c = 0; c < p.D; ++c) {
    xn[c] = static_cast<acc_t>(x[c]) * r * norm[c];
  }
}

// z_t = sum over taps i of taps[i] * xn_{t - (K - 1 - i) * dilation} (zero before the start).
template <typename acc_t>
void convolve(const ShortConvCpuParams& p, const acc_t* taps, const Scratch<acc_t>& s, int64_t t) {
  acc_t* __restrict__ z = s.z;
  for (int64_t c = 0; c < p.D; ++c) {
    z[c] = 0;
  }
  for (int64_t i = 0; i < p.K; ++i) {
    const int64_t src = t - (p.K - 1 - i) * p.dilation;
    if (src < 0) {
      continue;
    }
    const acc_t* __restrict__ xn = s.xn_row(src);
    const acc_t* __restrict__ tap = taps + i * p.D;
    for (int64_t c = 0; c < p.D; ++c) {
      z[c] += tap[c] * xn[c];
    }
  }
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

template <typename scalar_t>
void forward(const ShortConvCpuParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* y = static_cast<scalar_t*>(p.out);
  for_each_sequence<acc_t>(p, [&](const Scratch<acc_t>& s, const Sequence<acc_t>& seq, int64_t) {
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t offset = seq.offset(t);
      normalize(p, x + offset, seq.norm, s, t);
      convolve(p, seq.taps, s, t);
      silu_in_place<acc_t, false>(s.z, p.D);
      for (int64_t c = 0; c < p.D; ++c) {
        y[offset + c] = static_cast<scalar_t>(p.residual ? static_cast<acc_t>(x[offset + c]) + s.z[c] : s.z[c]);
      }
    }
  });
}

template <typename scalar_t>
void backward(const ShortConvCpuParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* gy = static_cast<const scalar_t*>(p.grad_y);
  auto* gx = static_cast<scalar_t*>(p.out);
  const int64_t ctx = p.context();
  for_each_sequence<acc_t>(p, [&](const Scratch<acc_t>& s, const Sequence<acc_t>& seq, int64_t task) {
    const acc_t* taps = seq.taps;
    const acc_t* norm = seq.norm;
    acc_t* gtaps = static_cast<acc_t*>(p.partials) + task * (p.K + 1) * p.D;  // [K, D], then the norm's [D]
    acc_t* gnorm = gtaps + p.K * p.D;
    for (int64_t e = 0; e < (p.K + 1) * p.D; ++e) {
      gtaps[e] = 0;
    }
    for (int64_t t = 0; t < p.T + ctx; ++t) {
      acc_t* __restrict__ gz_t = s.gz_row(t);
      if (t < p.T) {
        normalize(p, x + seq.offset(t), norm, s, t);
        convolve(p, taps, s, t);
        silu_in_place<acc_t, true>(s.z, p.D);
        for (int64_t c = 0; c < p.D; ++c) {
          gz_t[c] = static_cast<acc_t>(gy[seq.offset(t) + c]) * s.z[c];
        }
      } else {
        for (int64_t c = 0; c < p.D; ++c) {
          gz_t[c] = 0;  // past the end: no output there
        }
      }
      const int64_t q = t - ctx;  // every gz_{q + j * dilation} it needs is now known
      if (q < 0) {
        continue;
      }
      const acc_t* __restrict__ xn = s.xn_row(q);
      acc_t* __restrict__ gxn = s.gxn;
      for (int64_t c = 0; c < p.D; ++c) {
        gxn[c] = 0;
      }
      for (int64_t i = 0; i < p.K; ++i) {
        const acc_t* __restrict__ gz_s = s.gz_row(q + (p.K - 1 - i) * p.dilation);
        const acc_t* __restrict__ tap = taps + i * p.D;
        acc_t* __restrict__ gtap = gtaps + i * p.D;
        for (int64_t c = 0; c < p.D; ++c) {
          gxn[c] += tap[c] * gz_s[c];
          gtap[c] += gz_s[c] * xn[c];
        }
      }
      // Through RMSNorm: dx = r * gxn * nw - x * r^3 / D * sum(gxn * nw * x).
      const int64_t offset = seq.offset(q);
      const acc_t r = s.inv_rms(q);
      acc_t dot = 0;
      for (int64_t c = 0; c < p.D; ++c) {
        const auto xv = static_cast<acc_t>(x[offset + c]);
        dot += gxn[c] * norm[c] * xv;
        gnorm[c] += gxn[c] * xv * r;
      }
      const acc_t coef = dot * r * r * r / static_cast<acc_t>(p.D);
      for (int64_t c = 0; c < p.D; ++c) {
        acc_t dx = r * gxn[c] * norm[c] - static_cast<acc_t>(x[offset + c]) * coef;
        if (p.residual) {
          dx += static_cast<acc_t>(gy[offset + c]);
        }
        gx[offset + c] = static_cast<scalar_t>(dx);
      }
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
