// CPU host functions of lookup and lookup_backward (csrc/lookup.h) and their registration: checks,
// the indices sorted once (stable), and the backward kernel of the best SIMD capability.
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "cpu/capability.h"
#include "cpu/lookup_cpu_kernels.h"
#include "lookup.h"

#include <vector>

namespace retrieval_attention {
namespace {

const cpu::LookupKernels& kernels() {
  static const cpu::LookupKernels selected =
      cpu::best_variant(std::vector<cpu::LookupKernels> RA_CPU_VARIANTS(lookup_kernels));
  return selected;
}

void check_in_range(const char* op, const at::Tensor& flat, int64_t num_rows) {
  if (flat.numel() == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(flat);
  const int64_t min = lo.item<int64_t>();
  const int64_t max = hi.item<int64_t>();
  TORCH_CHECK_INDEX(min >= 0 && max < num_rows, op, ": expected `indices` in [0, ", num_rows, "), but got values in [",
                    min, ", ", max, "]");
}

}  // namespace

at::Tensor lookup_cpu(const at::Tensor& weight, const at::Tensor& indices) {
  constexpr const char* kOp = "retrieval_attention.lookup";
  check_lookup(kOp, weight, indices, false);
  check_in_range(kOp, indices.reshape({-1}), weight.size(0));
  return gather_rows(weight, indices);
}

at::Tensor lookup_backward_cpu(const at::Tensor& grad, const at::Tensor& indices, int64_t num_rows) {
  constexpr const char* kOp = "retrieval_attention.lookup_backward";
  check_lookup(kOp, grad, indices, true);
  TORCH_CHECK_VALUE(num_rows >= 0, kOp, ": expected `num_rows` >= 0, but got ", num_rows);
  const int64_t dim = grad.size(-1);
  at::Tensor out = at::empty({num_rows, dim}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor flat = indices.reshape({-1});
  check_in_range(kOp, flat, num_rows);
  const at::Tensor rows = grad.reshape({-1, dim}).contiguous();
  const auto [sorted, order] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  cpu::LookupBackwardParams p{rows.data_ptr(),
                              sorted.data_ptr<int64_t>(),
                              order.data_ptr<int64_t>(),
                              out.data_ptr(),
                              flat.numel(),
                              num_rows,
                              dim};
  kernels().backward(p, grad.scalar_type());
  return out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  m.impl("lookup", TORCH_FN(retrieval_attention::lookup_cpu));
  m.impl("lookup_backward", TORCH_FN(retrieval_attention::lookup_backward_cpu));
}
