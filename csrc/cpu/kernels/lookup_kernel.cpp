// CPU kernel of lookup_backward: each thread owns a range of the table's rows and writes each row
// once, the sum of its grad rows (in position order) or zeros, with streaming stores: the table is
// far larger than the caches and nothing reads it soon, so no line is read before it is written.
// Compiled once per CPU capability (see lookup_cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/kernels/lanes.h"
#include "cpu/lookup_cpu_kernels.h"

#include <algorithm>

#ifndef CPU_CAPABILITY
#error "lookup_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

// Table rows per parallel task: a few hundred KiB written each.
constexpr int64_t kRowGrain = 1024;

template <typename scalar_t>
void backward(const LookupBackwardParams& p) {
  using L = Lanes<scalar_t>;
  const auto* grad = static_cast<const scalar_t*>(p.grad);
  auto* out = static_cast<scalar_t*>(p.out);
  at::parallel_for(0, p.R, kRowGrain, [&](int64_t r0, int64_t r1) {
    int64_t j = std::lower_bound(p.sorted_rows, p.sorted_rows + p.M, r0) - p.sorted_rows;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t end = j;
      while (end < p.M && p.sorted_rows[end] == r) {
        ++end;
      }
      scalar_t* dst = out + r * p.dim;
      for_each_chunk<L::kWidth>(p.dim, [&](int64_t d, int64_t n) {
        auto sum = L::splat(0);
        for (int64_t i = j; i < end; ++i) {
          const auto g = L::load(grad + p.order[i] * p.dim + d, n);
          for (const auto v : c10::irange(L::kVecs)) {
            sum[v] = sum[v] + g[v];
          }
        }
        L::stream(dst + d, sum, n);
      });
      j = end;
    }
    stream_fence();
  });
}

void lookup_backward(const LookupBackwardParams& p, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lookup_backward", [&] { backward<scalar_t>(p); });
}

}  // namespace

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

LookupKernels lookup_kernels() { return {&lookup_backward, RA_STRINGIFY(CPU_CAPABILITY)}; }

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
