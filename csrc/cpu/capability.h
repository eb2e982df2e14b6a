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
