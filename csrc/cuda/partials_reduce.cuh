// The deterministic sum of per-block partial rows that the backward kernels write (no atomics): the
// gate's weight gradient and the short convolution's parameter gradients.
#pragma once

#include "common/static_switch.h"
#include "cuda/device_utils.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kReduceColumns = 32;  // column packs of one block
constexpr int kReduceGroups = 8;    // ranges of partial rows summed side by side, then in order
constexpr int kReduceThreads = kReduceColumns * kReduceGroups;

// out = the sum over partial rows b, in order: group r sums its contiguous range of rows, then
// group 0 adds the groups' sums in order. kRVec columns per thread (16 bytes where the size allows).
template <typename acc_t, int kRVec>
__global__ void __launch_bounds__(kReduceThreads)
    partials_reduce_kernel(const acc_t* __restrict__ partials, int64_t num_partials, int64_t size,
                           acc_t* __restrict__ out) {
  acc_t* sums = shared_memory<acc_t>();  // [kReduceGroups, kReduceColumns, kRVec]
  const int column = threadIdx.x % kReduceColumns;
  const int group = threadIdx.x / kReduceColumns;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kReduceColumns + column) * kRVec;
  const int64_t per = (num_partials + kReduceGroups - 1) / kReduceGroups;
  const int64_t b_begin = std::min(num_partials, group * per);
  const int64_t b_end = std::min(num_partials, b_begin + per);
  acc_t total[kRVec];
#pragma unroll
  for (int i = 0; i < kRVec; ++i) {
    total[i] = acc_t(0);
  }
  if (e < size) {
#pragma unroll 4
    for (int64_t b = b_begin; b < b_end; ++b) {
      acc_t x[kRVec];
      load_acc(partials + b * size + e, x);
#pragma unroll
      for (int i = 0; i < kRVec; ++i) {
        total[i] += x[i];
      }
    }
  }
  store_acc(sums + threadIdx.x * kRVec, total);
  __syncthreads();
  if (group == 0 && e < size) {
    for (int r = 1; r < kReduceGroups; ++r) {
      acc_t x[kRVec];
      load_acc(sums + (r * kReduceColumns + column) * kRVec, x);
#pragma unroll
      for (int i = 0; i < kRVec; ++i) {
        total[i] += x[i];
      }
    }
    store_acc(out + e, total);
  }
}

// out[size] = the sum of partials[num_partials, size] over its rows, launched through `launch`.
template <typename acc_t, typename Launcher>
void reduce_partials(Launcher& launch, const acc_t* partials, int64_t num_partials, int64_t size, acc_t* out) {
  constexpr int kAccVec = kVectorBytes / sizeof(acc_t);
  RA_BOOL_SWITCH(size % kAccVec == 0, kVectorizeReduce, [&] {
    constexpr int kRVec = kVectorizeReduce ? kAccVec : 1;
    const int64_t blocks = (size / kRVec + kReduceColumns - 1) / kReduceColumns;
    const size_t bytes = static_cast<size_t>(kReduceThreads) * kRVec * sizeof(acc_t);
    launch(partials_reduce_kernel<acc_t, kRVec>, blocks, kReduceThreads, bytes, partials, num_partials, size, out);
  });
}

}  // namespace retrieval_attention::cuda
