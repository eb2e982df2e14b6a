// CUDA fp8_lookup: a group of lanes per looked-up row (a power of two up to a warp, enough for one
// pass over the row), each lane moving kFp8Vec bytes per step as one 8-byte load and kFp8Vec outputs
// as one aligned store; grid-strided over the rows. Rows that do not allow the aligned path (a width
// or block not a multiple of kFp8Vec, an unaligned table) take the same loop one element at a time.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/fp8_lookup_host.h"
#include "common/fp8_math.h"
#include "cuda/common.cuh"
#include "cuda/device_utils.cuh"
#include "fp8_lookup.h"

namespace retrieval_attention {
namespace cuda {
namespace {

constexpr int kFp8Threads = 256;
constexpr int kFp8BlocksPerSm = 8;
constexpr int kFp8Vec = 8;  // e4m3 bytes per lane and step: one 8-byte load

template <typename scalar_t, typename index_t, bool kAligned>
__global__ void __launch_bounds__(kFp8Threads) fp8_lookup_kernel(const Fp8LookupParams p, const int lanes) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int64_t groups_per_block = kFp8Threads / lanes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const auto* indices = static_cast<const index_t*>(p.indices);
  auto* out = static_cast<scalar_t*>(p.out);
  for (int64_t n = blockIdx.x * groups_per_block + threadIdx.x / lanes; n < p.N; n += step) {
    const int64_t r = indices[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < p.R);  // a device-side assertion, as for an embedding index
    if (r < 0 || r >= p.R) {
      continue;  // where assertions are compiled out: nothing read out of bounds
    }
    const uint8_t* src = p.rows + r * p.rows_stride;
    const uint8_t* scale = p.scales + r * p.scales_stride;
    scalar_t* dst = out + n * p.dim;
    if constexpr (kAligned) {
      // block % kFp8Vec == 0: the kFp8Vec columns of a step share one scale.
      for (int64_t c = static_cast<int64_t>(lane) * kFp8Vec; c < p.dim; c += static_cast<int64_t>(lanes) * kFp8Vec) {
        const auto bytes = load_pack<uint8_t, kFp8Vec>(src + c);
        const float s = decode_ue8m0(scale[c / p.block]);
        Pack<scalar_t, kFp8Vec> values;
#pragma unroll
        for (int i = 0; i < kFp8Vec; ++i) {
          values.v[i] = static_cast<scalar_t>(dequantize_e4m3(bytes.v[i], s));
        }
        store_pack<scalar_t, kFp8Vec>(dst + c, values);
      }
    } else {
      for (int64_t c = lane; c < p.dim; c += lanes) {
        dst[c] = static_cast<scalar_t>(dequantize_e4m3(src[c], decode_ue8m0(scale[c / p.block])));
      }
    }
  }
}

// The lanes per row: the least power of two covering the row in one pass, at most a warp.
int lanes_per_row(int64_t dim, bool aligned) {
  const int64_t steps = aligned ? (dim + kFp8Vec - 1) / kFp8Vec : dim;
  int lanes = 1;
  while (lanes < kWarpSize && lanes < steps) {
    lanes *= 2;
  }
  return lanes;
}

template <typename scalar_t, typename index_t>
void launch_fp8_lookup(const Fp8LookupParams& p, cudaStream_t stream) {
  const bool aligned = p.dim % kFp8Vec == 0 && p.block % kFp8Vec == 0 && p.rows_stride % kFp8Vec == 0 &&
                       reinterpret_cast<uintptr_t>(p.rows) % kFp8Vec == 0;
  const int lanes = lanes_per_row(p.dim, aligned);
  const int64_t groups_per_block = kFp8Threads / lanes;
  const auto blocks =
      static_cast<unsigned int>(grid_size((p.N + groups_per_block - 1) / groups_per_block, kFp8BlocksPerSm));
  if (aligned) {
    fp8_lookup_kernel<scalar_t, index_t, true><<<blocks, kFp8Threads, 0, stream>>>(p, lanes);
  } else {
    fp8_lookup_kernel<scalar_t, index_t, false><<<blocks, kFp8Threads, 0, stream>>>(p, lanes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

// Indices outside [0, R) are caught on the device (CUDA_KERNEL_ASSERT): a host check would cost a
// synchronization per call.
at::Tensor fp8_lookup_cuda(const at::Tensor& rows, const at::Tensor& scales, const at::Tensor& indices, int64_t block,
                           at::ScalarType dtype) {
  TORCH_CHECK(rows.is_cuda(), "retrieval_attention.fp8_lookup: expected `rows` on the CUDA device of the other ",
              "inputs, but got ", rows.device());
  const c10::cuda::CUDAGuard device_guard(rows.device());
  auto plan = plan_fp8_lookup(rows, scales, indices, block, dtype);
  if (plan.out.numel() == 0) {
    return plan.out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fp8_lookup_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(plan.indices.scalar_type(), "fp8_lookup_cuda",
                            [&] { cuda::launch_fp8_lookup<scalar_t, index_t>(plan.params, stream); });
  });
  return plan.out;
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) { m.impl("fp8_lookup", &retrieval_attention::fp8_lookup_cuda); }
