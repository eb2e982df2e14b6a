// SIMD chunks shared by the CPU kernels: a row of scalar_t walked kWidth elements at a time and
// held as acc_t vectors. Included only by files compiled once per capability (kernels/*.cpp), so
// every name lives in the namespace CPU_CAPABILITY expands to.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "lanes.h is included only by kernels compiled once per capability"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// A chunk of kWidth elements of scalar_t held as acc_t vectors: float and double load
// directly; float16 and bfloat16 are widened to float in registers.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using AccVec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kWidth = kVecs * AccVec::size();
  using Chunk = std::array<AccVec, kVecs>;

  static Chunk load(const scalar_t* p, int64_t count = kWidth) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
      return {lo, hi};
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

  static void store(scalar_t* p, const Chunk& c, int64_t count = kWidth) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(c[0], c[1]).store(p, count);
    } else {
      c[0].store(p, count);
    }
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
