// Choosing among the per-capability variants of CPU kernels (csrc/cpu/kernels/), as ATen does.
#pragma once

#include <ATen/Version.h>

#include <string>
#include <vector>

namespace retrieval_attention::cpu {

inline int capability_rank(const std::string& name) {
  if (name == "AVX512") {
    return 2;
  }
  return name == "AVX2" ? 1 : 0;
}

// The best of `variants` (lowest first, each naming its .capability) that this CPU and
// ATEN_CPU_CAPABILITY allow: at::get_cpu_capability() is what ATen itself dispatches on.
template <typename Kernels>
Kernels best_variant(const std::vector<Kernels>& variants) {
  const int allowed = capability_rank(at::get_cpu_capability());
  Kernels best = variants.front();
  for (const auto& v : variants) {
    if (capability_rank(v.capability) <= allowed) {
      best = v;
    }
  }
  return best;
}

}  // namespace retrieval_attention::cpu

// RA_CPU_VARIANTS(fn): a braced list of every compiled variant of the per-capability function
// cpu::<CAPABILITY>::fn() (kernels/*.cpp), lowest first; the build's capability #ifdefs, written once.
#ifdef RA_CPU_AVX2
#define RA_CPU_VARIANT_AVX2(fn) , ::retrieval_attention::cpu::AVX2::fn()
#else
#define RA_CPU_VARIANT_AVX2(fn)
#endif
#ifdef RA_CPU_AVX512
#define RA_CPU_VARIANT_AVX512(fn) , ::retrieval_attention::cpu::AVX512::fn()
#else
#define RA_CPU_VARIANT_AVX512(fn)
#endif
#define RA_CPU_VARIANTS(fn) \
  { ::retrieval_attention::cpu::DEFAULT::fn() RA_CPU_VARIANT_AVX2(fn) RA_CPU_VARIANT_AVX512(fn) }
