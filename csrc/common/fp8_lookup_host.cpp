#include "common/fp8_lookup_host.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <vector>

namespace retrieval_attention {
namespace {

constexpr const char* kOp = "retrieval_attention.fp8_lookup";

void check_device(const char* name, const at::Tensor& t, const at::Tensor& rows) {
  TORCH_CHECK(t.device() == rows.device(), kOp, ": expected `", name, "` on the device of `rows` (", rows.device(),
              "), but got ", t.device());
}

// Columns contiguous, so a row is read as bytes in a row; the row stride is free.
at::Tensor columns_contiguous(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace

Fp8LookupPlan plan_fp8_lookup(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices,
                              int64_t block, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kFloat8_e4m3fn, kOp,
                   ": expected `rows` [R, dim] of dtype float8_e4m3fn, but got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 2, kOp, ": expected `rows` of shape [R, dim], but got ", rows.sizes());
  TORCH_CHECK_VALUE(block >= 1, kOp, ": expected `block` >= 1, but got ", block);
  const int64_t R = rows.size(0);
  const int64_t dim = rows.size(1);
  const int64_t num_blocks = (dim + block - 1) / block;
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kByte || scales.scalar_type() == at::kFloat8_e8m0fnu, kOp,
                   ": expected `scales` [R, ceil(dim / block)] of dtype uint8 or float8_e8m0fnu (UE8M0 bytes), "
                   "but got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == R && scales.size(1) == num_blocks, kOp,
                    ": expected `scales` of shape [R, ceil(dim / block)] = [", R, ", ", num_blocks, "] for `rows` ",
                    rows.sizes(), " and block ", block, ", but got ", scales.sizes());
  check_device("scales", scales, rows);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, kOp,
                   ": expected `indices` of dtype int64 or int32, but got ", indices.scalar_type());
  check_device("indices", indices, rows);
  const bool floating = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(floating, kOp, ": expected `dtype` float32, float64, float16 or bfloat16, but got ", dtype);

  Fp8LookupPlan plan;
  plan.rows = columns_contiguous(rows);
  plan.scales = columns_contiguous(scales);
  plan.indices = indices.contiguous();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(dim);
  plan.out = at::empty(shape, rows.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  auto& p = plan.params;
  p.R = R;
  p.dim = dim;
  p.block = block;
  p.N = indices.numel();
  p.rows = static_cast<const uint8_t*>(plan.rows.const_data_ptr());
  p.rows_stride = plan.rows.stride(0);
  p.scales = static_cast<const uint8_t*>(plan.scales.const_data_ptr());
  p.scales_stride = plan.scales.stride(0);
  p.indices = plan.indices.const_data_ptr();
  p.out = plan.out.data_ptr();
  return plan;
}

void check_index_in_range(bool found, int64_t index, int64_t R) {
  TORCH_CHECK_INDEX(!found, kOp, ": expected every entry of `indices` in [0, R) = [0, ", R, "), but got ", index);
}

}  // namespace retrieval_attention
