// SIMD chunks shared by the CPU kernels: a row of scalar_t walked kWidth elements at a time and
// held as acc_t vectors (float16/bfloat16 as float, float as float or double). Included only by
// files compiled once per capability (kernels/*.cpp), so every name lives in the namespace
// CPU_CAPABILITY expands to.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "lanes.h is included only by kernels compiled once per capability"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// float <-> double, one float vector to two double vectors: ATen has no vector path for it.
inline std::array<Vectorized<double>, 2> float_to_double(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  return {Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(v))),
          Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = x;
  return {Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(v))),
          Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))};
#else
  __at_align__ float in[Vectorized<float>::size()];
  __at_align__ double out[Vectorized<float>::size()];
  x.store(in);
  for (const auto i : c10::irange(Vectorized<float>::size())) {
    out[i] = in[i];
  }
  return {Vectorized<double>::loadu(out), Vectorized<double>::loadu(out + Vectorized<double>::size())};
#endif
}

inline Vectorized<float> double_to_float(const Vectorized<double>& lo, const Vectorized<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vectorized<float>(_mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vectorized<float>(_mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
#else
  __at_align__ double in[Vectorized<float>::size()];
  __at_align__ float out[Vectorized<float>::size()];
  lo.store(in);
  hi.store(in + Vectorized<double>::size());
  for (const auto i : c10::irange(Vectorized<float>::size())) {
    out[i] = static_cast<float>(in[i]);
  }
  return Vectorized<float>::loadu(out);
#endif
}

// The widest vector word and its streaming store, where the capability has one.
#if defined(CPU_CAPABILITY_AVX512)
using StreamWord = __m512i;
inline void stream_word(StreamWord* p, StreamWord w) { _mm512_stream_si512(p, w); }
#elif defined(CPU_CAPABILITY_AVX2)
using StreamWord = __m256i;
inline void stream_word(StreamWord* p, StreamWord w) { _mm256_stream_si256(p, w); }
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename T>
inline void stream_bytes(void* p, const T& v) {
  static_assert(sizeof(T) == sizeof(StreamWord));
  StreamWord bits;
  std::memcpy(&bits, &v, sizeof(bits));
  stream_word(static_cast<StreamWord*>(p), bits);
}
#endif

// Asks for a row's cache lines ahead of its use.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  constexpr int64_t kLine = 64;
  const auto* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += kLine) {
    __builtin_prefetch(bytes + b);
  }
}

// Orders this thread's streaming stores before what follows (they are weakly ordered).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// One vector of scalar_t held as acc_t vectors: as is, or widened to two (half types to float, float to double).
template <typename scalar_t, typename acc_t_ = at::opmath_type<scalar_t>>
struct Lanes {
  using acc_t = acc_t_;
  using AccVec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr bool kWidened = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kWidened || sizeof(acc_t) == 2 * sizeof(scalar_t), "a chunk widens to exactly two vectors");
  static constexpr int kVecs = kWidened ? 2 : 1;
  static constexpr int64_t kWidth = kVecs * AccVec::size();
  using Chunk = std::array<AccVec, kVecs>;

  static Chunk load(const scalar_t* p, int64_t count = kWidth) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
      return {lo, hi};
    } else if constexpr (kWidened) {
      return float_to_double(Vectorized<scalar_t>::loadu(p, count));
    } else {
      return {AccVec::loadu(p, count)};
    }
  }

  // Loads acc_t data (the product weight, the weight-gradient partials) in the same shape.
  static Chunk load_acc(const acc_t* p, int64_t count = kWidth) {
    Chunk c;
    for (const auto i : c10::irange(kVecs)) {
      const int64_t n = std::clamp<int64_t>(count - i * AccVec::size(), 0, AccVec::size());
      c[i] = AccVec::loadu(p + i * AccVec::size(), n);
    }
    return c;
  }

  // The chunk as one vector of scalar_t.
  static Vectorized<scalar_t> narrow(const Chunk& c) {
    if constexpr (kReduced) {
      return at::vec::convert_from_float<scalar_t>(c[0], c[1]);
    } else if constexpr (kWidened) {
      return double_to_float(c[0], c[1]);
    } else {
      return c[0];
    }
  }

  static void store(scalar_t* p, const Chunk& c, int64_t count = kWidth) { narrow(c).store(p, count); }

  // A store that bypasses the caches (no read of the line first) for a full, aligned chunk of an
  // output nothing reads soon; any other chunk stores as usual. Call stream_fence() after the last.
  static void stream(scalar_t* p, const Chunk& c, int64_t count = kWidth) {
    const auto v = narrow(c);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (count == kWidth && reinterpret_cast<uintptr_t>(p) % sizeof(v) == 0) {
      stream_bytes(p, v);
      return;
    }
#endif
    v.store(p, count);
  }

  static void store_acc(acc_t* p, const Chunk& c, int64_t count = kWidth) {
    for (const auto i : c10::irange(kVecs)) {
      const int64_t n = std::clamp<int64_t>(count - i * AccVec::size(), 0, AccVec::size());
      if (n > 0) {
        c[i].store(p + i * AccVec::size(), n);
      }
    }
  }

  static Chunk splat(acc_t x) {
    Chunk c;
    c.fill(AccVec(x));
    return c;
  }

  static acc_t sum(const Chunk& c) {
    AccVec t = c[0];
    for (const auto i : c10::irange(1, kVecs)) {
      t = t + c[i];
    }
    return at::vec::vec_reduce_all<acc_t>([](AccVec x, AccVec y) { return x + y; }, t);
  }
};

// SiLU(z), or SiLU'(z) = s * (1 + z * (1 - s)) with s = sigmoid(z): vectorized exp, as ATen's silu.
template <bool kGrad, typename Vec>
Vec silu_vec(const Vec& z) {
  const Vec one(1);
  const Vec s = one / (one + z.neg().exp_u20());
  return kGrad ? s * (one + z * (one - s)) : z * s;
}

// Calls body(offset, count) over [0, D) in chunks of W: full chunks, then one ragged tail.
template <int64_t W, typename Body>
inline void for_each_chunk(int64_t D, const Body& body) {
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    body(d, W);
  }
  if (d < D) {
    body(d, D - d);
  }
}

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
