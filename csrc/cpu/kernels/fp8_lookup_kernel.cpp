// CPU kernel of fp8_lookup (docs/ngram.md#fp8-tables): at::parallel_for over the looked-up rows;
// each row is decoded block by block, every element times its block's power-of-two scale.
//
// Compiled once per CPU capability (see fp8_lookup_cpu_kernels.h); every name below lives in the
// namespace CPU_CAPABILITY expands to. Only raw pointers cross this file's boundary, and no std::
// template of a plain type is instantiated here (see gate_kernel.cpp): the flag the chunks raise is
// set with the compiler's atomic built-in.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/fp8_math.h"
#include "cpu/fp8_lookup_cpu_kernels.h"

#ifndef CPU_CAPABILITY
#error "fp8_lookup_kernel.cpp is compiled once per capability with CPU_CAPABILITY defined"
#endif

namespace retrieval_attention::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kGrainElements = 32768;  // output elements per parallel chunk, at least one row

// Looks up output rows [begin, end); returns whether an index among them is outside [0, R), and
// sets bad to one such index.
template <typename scalar_t, typename index_t>
bool lookup_rows(const Fp8LookupParams& p, int64_t begin, int64_t end, int64_t& bad) {
  const auto* indices = static_cast<const index_t*>(p.indices);
  auto* out = static_cast<scalar_t*>(p.out);
  bool found = false;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t r = indices[n];
    if (r < 0 || r >= p.R) {
      found = true;
      bad = r;
      continue;
    }
    const uint8_t* __restrict__ src = p.rows + r * p.rows_stride;
    const uint8_t* scale = p.scales + r * p.scales_stride;
    scalar_t* __restrict__ dst = out + n * p.dim;
    for (int64_t start = 0, b = 0; start < p.dim; start += p.block, ++b) {
      const float s = decode_ue8m0(scale[b]);
      const int64_t stop = start + p.block < p.dim ? start + p.block : p.dim;
      for (int64_t c = start; c < stop; ++c) {
        dst[c] = static_cast<scalar_t>(dequantize_e4m3(src[c], s));
      }
    }
  }
  return found;
}

bool fp8_lookup(const Fp8LookupParams& p, c10::ScalarType dtype, c10::ScalarType index_dtype, int64_t* bad) {
  const int64_t grain = p.dim > kGrainElements ? 1 : kGrainElements / (p.dim > 0 ? p.dim : 1);
  // Any one bad index is enough for the error; the race between chunks only picks which.
  bool found = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fp8_lookup_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(index_dtype, "fp8_lookup_cpu", [&] {
      at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
        int64_t local = 0;
        if (lookup_rows<scalar_t, index_t>(p, begin, end, local)) {
          __atomic_store_n(bad, local, __ATOMIC_RELAXED);
          __atomic_store_n(&found, true, __ATOMIC_RELAXED);
        }
      });
    });
  });
  return found;
}

}  // namespace

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

Fp8LookupKernels fp8_lookup_kernels() { return {&fp8_lookup, RA_STRINGIFY(CPU_CAPABILITY)}; }

}  // namespace retrieval_attention::cpu::CPU_CAPABILITY
