// fp8_lookup's CUDA kernel and its launch plan (docs/ngram.md#fp8-tables), shared by fp8_lookup.cu
// and the C++ tests' emulator.
//
// A group of lanes per looked-up row (a power of two up to a warp, enough for one pass over the
// row), each lane moving kFp8Vec bytes per step as one 8-byte load and kFp8Vec outputs as one
// aligned store; grid-strided over the rows. Rows that do not allow the aligned path (a width or
// block not a multiple of kFp8Vec, an unaligned table) take the same loop one element at a time.
#pragma once

#include <c10/macros/Macros.h>

#include "common/fp8_lookup_host.h"
#include "common/fp8_math.h"
#include "cuda/device_utils.cuh"

#include <algorithm>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kFp8Threads = 256;
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

// Whether every step of a row can move kFp8Vec bytes as one aligned access (the output, fresh and
// dim % kFp8Vec == 0, then is aligned too).
inline bool fp8_lookup_aligned(const Fp8LookupParams& p) {
  return p.dim % kFp8Vec == 0 && p.block % kFp8Vec == 0 && p.rows_stride % kFp8Vec == 0 &&
         reinterpret_cast<uintptr_t>(p.rows) % kFp8Vec == 0;
}

// The lanes per row: the least power of two covering the row in one pass, at most a warp.
inline int fp8_lookup_lanes(int64_t dim, bool aligned) {
  const int64_t steps = aligned ? (dim + kFp8Vec - 1) / kFp8Vec : dim;
  int lanes = 1;
  while (lanes < kWarpSize && lanes < steps) {
    lanes *= 2;
  }
  return lanes;
}

// Launches on `launch` (CudaLauncher on the GPU, the emulator's in the C++ tests): as many blocks
// as rows need, at most what is resident at once.
template <typename scalar_t, typename index_t, typename Launcher>
void run_fp8_lookup(const Fp8LookupParams& p, Launcher& launch) {
  const bool aligned = fp8_lookup_aligned(p);
  const int lanes = fp8_lookup_lanes(p.dim, aligned);
  const int64_t groups_per_block = kFp8Threads / lanes;
  const int64_t needed = (p.N + groups_per_block - 1) / groups_per_block;
  auto* kernel = aligned ? &fp8_lookup_kernel<scalar_t, index_t, true> : &fp8_lookup_kernel<scalar_t, index_t, false>;
  launch(kernel, std::min(needed, launch.max_blocks(kernel, kFp8Threads, 0)), kFp8Threads, 0, p, lanes);
}

}  // namespace retrieval_attention::cuda
