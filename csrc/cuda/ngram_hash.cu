// CUDA ngram_hash: one thread per output element (token, order, head), grid-strided, so the
// int64 stores coalesce; the few ids a token's mix reads are shared by its neighbours in L1.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/ngram_hash_host.h"
#include "common/ngram_hash_math.h"
#include "cuda/common.cuh"
#include "ngram_hash.h"

namespace retrieval_attention {
namespace cuda {
namespace {

constexpr int kNgramThreads = 256;
constexpr int kNgramBlocksPerSm = 8;

__global__ void __launch_bounds__(kNgramThreads) ngram_hash_kernel(const NgramHashParams p) {
  const int64_t K = p.heads();
  const int64_t total = p.B * p.T * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t token = e / K;
    const int64_t k = e % K;  // (n - 2) * H + j, also the index of the prime in primes [max_n - 1, H]
    const int64_t b = token / p.T;
    const int64_t t = token % p.T;
    const int64_t n = k / p.H + 2;
    const int64_t start = sequence_start(p.cu_seqlens, p.num_offsets, t);
    const int64_t mix = ngram_mix(p.ids + b * p.ids_stride_b, p.ids_stride_t, t, n, p.multipliers, p.pad_id, start);
    p.out[e] = floor_mod(mix, p.primes[k]);
  }
}

void launch_ngram_hash(const NgramHashParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.T * p.heads();
  const int64_t blocks_needed = (total + kNgramThreads - 1) / kNgramThreads;
  const auto blocks = static_cast<unsigned int>(grid_size(blocks_needed, kNgramBlocksPerSm));
  ngram_hash_kernel<<<blocks, kNgramThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

// Checks that cost a device sync are limited to the primes and the offsets: (max_n - 1) * H and
// S + 1 values copied to the host, skipped while a CUDA graph is captured (a sync is illegal there). ids are not
// checked for negative values: that would need a sync per call. A negative id still hashes to
// a value in [0, P) (the arithmetic wraps and the modulo is floored), so nothing goes out of
// bounds; it is the caller's contract, as for an embedding index.
at::Tensor ngram_hash_cuda(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                           int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(ids.is_cuda(), "retrieval_attention.ngram_hash: expected `ids` on the CUDA device of the other inputs, ",
              "but got ", ids.device());
  const c10::cuda::CUDAGuard device_guard(ids.device());
  auto plan = plan_ngram_hash(ids, multipliers, primes, pad_id, cu_seqlens);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_primes_positive(plan.primes.cpu());
    if (plan.cu_seqlens.defined()) {
      check_cu_seqlens_values(plan.cu_seqlens.cpu(), plan.params.T);
    }
  }
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  cuda::launch_ngram_hash(plan.params, c10::cuda::getCurrentCUDAStream());
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) { m.impl("ngram_hash", &retrieval_attention::ngram_hash_cuda); }
