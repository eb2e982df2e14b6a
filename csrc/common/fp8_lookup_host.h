// Host-side work of fp8_lookup that both backends share: input checks, the output allocation and
// the kernel parameters. A backend's host function is then plan -> (return early when empty) -> launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace retrieval_attention {

// What the kernels read and write; the table and its scales are read in place (row strides free,
// columns contiguous), the indices and the output are contiguous.
struct Fp8LookupParams {
  int64_t R;            // rows of the table
  int64_t dim;          // columns of a row
  int64_t block;        // columns per scale
  int64_t N;            // indices, so rows of the output
  const uint8_t* rows;  // e4m3 bytes, row r at rows + r * rows_stride
  int64_t rows_stride;
  const uint8_t* scales;  // UE8M0 bytes, row r at scales + r * scales_stride
  int64_t scales_stride;
  const void* indices;  // [N], int64 or int32
  void* out;            // [N, dim], the output dtype
};

struct Fp8LookupPlan {
  at::Tensor out;
  at::Tensor rows, scales, indices;  // columns (indices: all) contiguous, kept alive until the launch ends
  Fp8LookupParams params;
};

// Checks every argument but the values of indices (the error names the argument), allocates the
// output and fills the params.
Fp8LookupPlan plan_fp8_lookup(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices,
                              int64_t block, at::ScalarType dtype);

// Raises an IndexError for an entry of indices outside [0, R) found by a kernel (CPU only: CUDA
// checks on the device).
void check_index_in_range(bool found, int64_t index, int64_t R);

}  // namespace retrieval_attention
