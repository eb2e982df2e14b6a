// Entry points of the fp8_lookup operator (docs/ngram.md#fp8-tables), one per backend.
//
//   rows     [R, dim]                         float8_e4m3fn, the table
//   scales   [R, ceil(dim / block)]           uint8 or float8_e8m0fnu: UE8M0 bytes, 2^(e - 127) per block
//   indices  [...]                            int64 or int32, every entry in [0, R)
//   block    int >= 1                         columns per scale: column c of a row uses scale c / block
//   dtype    float32, float64, float16 or bfloat16
// returns
//   out      [..., dim] of dtype, contiguous: out[i, c] = dtype(float(rows[indices[i], c])
//                                                          * 2^(scales[indices[i], c / block] - 127))
// No autograd: an inference lookup of a quantized table.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace retrieval_attention {

at::Tensor fp8_lookup_cpu(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                          at::ScalarType dtype);
at::Tensor fp8_lookup_cuda(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                           at::ScalarType dtype);

}  // namespace retrieval_attention
