// The gate's row sums on SIMD chunks, shared by the kernels that compute a gate row (the gate's and
// the decode step's), so both compute it alike. Included only by files compiled once per capability.
#pragma once

#include <c10/util/irange.h>

#include "common/gate_math.h"
#include "cpu/gate_cpu_kernels.h"
#include "cpu/kernels/lanes.h"

#include <cstdint>

namespace retrieval_attention::cpu::CPU_CAPABILITY {

// A row of scalar_t as vectors of the type the kernels compute it in (gate_cpu_kernels.h).
template <typename scalar_t>
using RowLanes = Lanes<scalar_t, ComputeType<scalar_t>>;

template <typename scalar_t, bool kHasWeight>
RowSums<ComputeType<scalar_t>> row_sums(const scalar_t* h, const scalar_t* k, const ComputeType<scalar_t>* w,
                                        int64_t D) {
  using L = RowLanes<scalar_t>;
  typename L::Chunk hh = L::splat(0), kk = L::splat(0), hk = L::splat(0);
  for_each_chunk<L::kWidth>(D, [&](int64_t d, int64_t n) {
    const auto hv = L::load(h + d, n);
    const auto kv = L::load(k + d, n);
    [[maybe_unused]] typename L::Chunk wv;
    if constexpr (kHasWeight) {
      wv = L::load_acc(w + d, n);
    }
    for (const auto i : c10::irange(L::kVecs)) {
      hh[i] = at::vec::fmadd(hv[i], hv[i], hh[i]);
      kk[i] = at::vec::fmadd(kv[i], kv[i], kk[i]);
      if constexpr (kHasWeight) {
        hk[i] = at::vec::fmadd(hv[i] * wv[i], kv[i], hk[i]);
      } else {
        hk[i] = at::vec::fmadd(hv[i], kv[i], hk[i]);
      }
    }
  });
  return {L::sum(hh), L::sum(kk), L::sum(hk)};
}

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
