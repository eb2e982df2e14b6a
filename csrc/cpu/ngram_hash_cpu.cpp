// CPU ngram_hash: at::parallel_for over the B * T tokens; each token builds its mix order by
// order (mix(n + 1) = mix(n) ^ x_{t-n} * m_n) and writes its (max_n - 1) * H outputs in a row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/ngram_hash_host.h"
#include "common/ngram_hash_math.h"
#include "ngram_hash.h"

#include <atomic>

namespace retrieval_attention {
namespace {

// Tokens per parallel chunk: one token is (max_n - 1) * H modulos, a few nanoseconds each.
constexpr int64_t kGrainTokens = 2048;

// Hashes tokens [begin, end); returns a negative id found among them (or 0 when none).
int64_t hash_tokens(const NgramHashParams& p, int64_t begin, int64_t end) {
  int64_t negative = 0;
  const int64_t K = p.heads();
  for (int64_t token = begin; token < end; ++token) {
    const int64_t b = token / p.T;
    const int64_t t = token % p.T;
    const int64_t* row = p.ids + b * p.ids_stride_b;
    const int64_t x = row[t * p.ids_stride_t];
    const int64_t start = sequence_start(p.cu_seqlens, p.num_offsets, t);
    // Each id is this position's token exactly once, so checking it here sees every id.
    negative = x < 0 ? x : negative;
    int64_t* out = p.out + token * K;
    int64_t mix = mix_step(0, x, p.multipliers[0]);
    for (int64_t n = 2; n <= p.max_n; ++n) {
      mix = mix_step(mix, token_before(row, p.ids_stride_t, t, n - 1, p.pad_id, start), p.multipliers[n - 1]);
      const int64_t first = (n - 2) * p.H;
      for (int64_t j = 0; j < p.H; ++j) {
        out[first + j] = floor_mod(mix, p.primes[first + j]);
      }
    }
  }
  return negative;
}

}  // namespace

at::Tensor ngram_hash_cpu(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                          int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens) {
  auto plan = plan_ngram_hash(ids, multipliers, primes, pad_id, cu_seqlens);
  check_primes_positive(plan.primes);
  if (plan.cu_seqlens.defined()) {
    check_cu_seqlens_values(plan.cu_seqlens, plan.params.T);
  }
  const auto& p = plan.params;
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  // Any one negative id is enough for the error; the race between chunks only picks which.
  std::atomic<int64_t> negative{0};
  at::parallel_for(0, p.B * p.T, kGrainTokens, [&](int64_t begin, int64_t end) {
    const int64_t found = hash_tokens(p, begin, end);
    if (found < 0) {
      negative.store(found, std::memory_order_relaxed);
    }
  });
  const int64_t id = negative.load(std::memory_order_relaxed);
  check_no_negative_id(id < 0, id);
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) { m.impl("ngram_hash", &retrieval_attention::ngram_hash_cpu); }
