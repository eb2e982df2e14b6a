// CPU host function of fp8_lookup (docs/ngram.md#fp8-tables) and its registration at the CPU key:
// checks, the output, and the kernel of the best SIMD capability (kernels/fp8_lookup_kernel.cpp).
#include <torch/library.h>

#include "common/fp8_lookup_host.h"
#include "cpu/capability.h"
#include "cpu/fp8_lookup_cpu_kernels.h"
#include "fp8_lookup.h"

#include <vector>

namespace retrieval_attention {
namespace {

const cpu::Fp8LookupKernels& kernels() {
  static const cpu::Fp8LookupKernels selected =
      cpu::best_variant(std::vector<cpu::Fp8LookupKernels> RA_CPU_VARIANTS(fp8_lookup_kernels));
  return selected;
}

}  // namespace

at::Tensor fp8_lookup_cpu(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                          at::ScalarType dtype) {
  auto plan = plan_fp8_lookup(rows, scales, indices, block, dtype);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  int64_t bad = 0;
  const bool found = kernels().lookup(plan.params, dtype, plan.indices.scalar_type(), &bad);
  check_index_in_range(found, bad, plan.params.R);
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) { m.impl("fp8_lookup", &retrieval_attention::fp8_lookup_cpu); }
