// CUDA lookup and lookup_backward (csrc/lookup.h): ATen's gather and its sort-based embedding
// backward (no atomics: deterministic), on the current stream. Indices are not range-checked on
// the host (that would synchronize); ATen's kernels assert on the device.
#include <ATen/ops/embedding_dense_backward.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "lookup.h"

namespace retrieval_attention {
namespace {

at::Tensor lookup_cuda(const at::Tensor& weight, const at::Tensor& indices) {
  check_lookup("retrieval_attention.lookup", weight, indices, false);
  const c10::cuda::CUDAGuard guard(weight.device());
  return gather_rows(weight, indices);
}

at::Tensor lookup_backward_cuda(const at::Tensor& grad, const at::Tensor& indices, int64_t num_rows) {
  check_lookup("retrieval_attention.lookup_backward", grad, indices, true);
  TORCH_CHECK_VALUE(num_rows >= 0, "retrieval_attention.lookup_backward: expected `num_rows` >= 0, but got ", num_rows);
  const c10::cuda::CUDAGuard guard(grad.device());
  return at::embedding_dense_backward(grad, indices, num_rows, /*padding_idx=*/-1, /*scale_grad_by_freq=*/false);
}

}  // namespace
}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("lookup", TORCH_FN(retrieval_attention::lookup_cuda));
  m.impl("lookup_backward", TORCH_FN(retrieval_attention::lookup_backward_cuda));
}
