// CPU fp8_lookup: at::parallel_for over the looked-up rows; each row decodes its bytes through a
// 256-entry table of the e4m3 values and multiplies each block by its power-of-two scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/fp8_lookup_host.h"
#include "common/fp8_math.h"
#include "fp8_lookup.h"

#include <algorithm>
#include <array>
#include <atomic>

namespace retrieval_attention {
namespace {

constexpr int kByteValues = 256;
constexpr int64_t kGrainElements = 32768;  // output elements per parallel chunk, at least one row

// Every e4m3 byte's float32 value, from the shared decode.
const std::array<float, kByteValues>& e4m3_values() {
  static const std::array<float, kByteValues> table = [] {
    std::array<float, kByteValues> t{};
    for (int b = 0; b < kByteValues; ++b) {
      t[b] = decode_e4m3(static_cast<uint8_t>(b));
    }
    return t;
  }();
  return table;
}

// Looks up output rows [begin, end); returns whether an index among them is outside [0, R), and
// sets bad to one such index (its output row is left unwritten: the call raises).
template <typename scalar_t, typename index_t>
bool lookup_rows(const Fp8LookupParams& p, int64_t begin, int64_t end, int64_t& bad) {
  const float* values = e4m3_values().data();
  const auto* indices = static_cast<const index_t*>(p.indices);
  auto* out = static_cast<scalar_t*>(p.out);
  bool found = false;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t r = indices[n];
    if (r < 0 || r >= p.R) {
      found = true;
      bad = r;
      continue;
    }
    const uint8_t* src = p.rows + r * p.rows_stride;
    const uint8_t* scale = p.scales + r * p.scales_stride;
    scalar_t* dst = out + n * p.dim;
    for (int64_t start = 0, b = 0; start < p.dim; start += p.block, ++b) {
      const float s = decode_ue8m0(scale[b]);
      const int64_t stop = start + p.block < p.dim ? start + p.block : p.dim;
      for (int64_t c = start; c < stop; ++c) {
        dst[c] = static_cast<scalar_t>(values[src[c]] * s);
      }
    }
  }
  return found;
}

}  // namespace

at::Tensor fp8_lookup_cpu(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                          at::ScalarType dtype) {
  auto plan = plan_fp8_lookup(rows, scales, indices, block, dtype);
  const auto& p = plan.params;
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, p.dim));
  // Any one bad index is enough for the error; the race between chunks only picks which.
  std::atomic<bool> found{false};
  std::atomic<int64_t> bad{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fp8_lookup_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(plan.indices.scalar_type(), "fp8_lookup_cpu", [&] {
      at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
        int64_t local = 0;
        if (lookup_rows<scalar_t, index_t>(p, begin, end, local)) {
          bad.store(local, std::memory_order_relaxed);
          found.store(true, std::memory_order_relaxed);
        }
      });
    });
  });
  check_index_in_range(found.load(), bad.load(), p.R);
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) { m.impl("fp8_lookup", &retrieval_attention::fp8_lookup_cpu); }
