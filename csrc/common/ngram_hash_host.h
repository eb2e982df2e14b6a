// Host-side work of ngram_hash that both backends share: input checks, the output
// allocation and the kernel parameters. A backend's host function is then
// plan -> (return early when empty) -> launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

namespace retrieval_attention {

// What the kernels read and write. ids are read in place through their strides (no copy
// for a non-contiguous view); the small tables and the output are contiguous.
struct NgramHashParams {
  int64_t B, T;
  int64_t max_n;  // highest n-gram order; orders 2..max_n are hashed
  int64_t H;      // heads per order
  const int64_t* ids;
  int64_t ids_stride_b, ids_stride_t;
  const int64_t* multipliers;  // [max_n]
  const int64_t* primes;       // [max_n - 1, H]
  int64_t* out;                // [B, T, (max_n - 1) * H]
  int64_t pad_id;
  const int64_t* cu_seqlens;  // [num_offsets] where packed sequences begin in the one row (B = 1), or nullptr
  int64_t num_offsets;

  C10_HOST_DEVICE int64_t heads() const { return (max_n - 1) * H; }  // outputs per token
};

struct NgramHashPlan {
  at::Tensor out;
  at::Tensor multipliers, primes;  // contiguous, kept alive until the launch ends
  at::Tensor cu_seqlens;           // int64, contiguous; undefined when nothing is packed
  NgramHashParams params;
};

// Checks every argument but the values of ids and primes (the error names the argument),
// allocates the output and fills the params.
NgramHashPlan plan_ngram_hash(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                              int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens);

// Raises unless every prime is > 0; primes must be on the CPU.
void check_primes_positive(const at::Tensor& primes);

// Raises unless the offsets (int64, on the CPU) start at 0, never decrease and end at T.
void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t T);

// Raises for a negative id found by a kernel (CPU only: the CUDA kernel does not look).
void check_no_negative_id(bool found, int64_t id);

}  // namespace retrieval_attention
