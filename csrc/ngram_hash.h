// Entry points of the ngram_hash operator (docs/ngram.md), one per backend.
//
//   ids          [B, T]                int64 >= 0, any strides
//   multipliers  [max_n]               int64 (odd), max_n >= 2
//   primes       [max_n - 1, H]        int64 > 0, H >= 1
//   pad_id       int >= 0              the token before the start of every sequence
// returns
//   out          [B, T, (max_n - 1) * H] int64, contiguous: out[b, t, (n - 2) * H + j]
//                = floor_mod(XOR_{i < n} ids[b, t - i] * multipliers[i], primes[n - 2, j])
// No autograd: the output is integer.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace retrieval_attention {

at::Tensor ngram_hash_cpu(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                          int64_t pad_id);
at::Tensor ngram_hash_cuda(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                           int64_t pad_id);

}  // namespace retrieval_attention
