// Entry points of the ngram_hash operator (docs/ngram.md), one per backend.
//
//   ids          [B, T]                int64 >= 0, any strides
//   multipliers  [max_n]               int64 (odd), max_n >= 2
//   primes       [max_n - 1, H]        int64 > 0, H >= 1
//   pad_id       int >= 0              the token before the start of every sequence
//   cu_seqlens   [S + 1] int32/int64   optional: sequences packed in one row (B = 1), sequence s at
//                                      [cu_seqlens[s], cu_seqlens[s + 1]); no n-gram crosses a boundary
// returns
//   out          [B, T, (max_n - 1) * H] int64, contiguous: out[b, t, (n - 2) * H + j]
//                = floor_mod(XOR_{i < n} ids[b, t - i] * multipliers[i], primes[n - 2, j])
// No autograd: the output is integer.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace retrieval_attention {

at::Tensor ngram_hash_cpu(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                          int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens);
at::Tensor ngram_hash_cuda(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                           int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens);

}  // namespace retrieval_attention
