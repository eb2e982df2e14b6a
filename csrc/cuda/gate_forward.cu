// CUDA forward of the gate: one block per (token, branch) row, grid-strided over rows.
// Pass 1 sums h^2, k^2 and h*k*w over the row (16-byte loads where aligned); the block
// sum is deterministic; pass 2 writes o = a * v (+ h), the h re-read hitting L1/L2.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "common/gate_math.h"
#include "common/static_switch.h"
#include "cuda/common.cuh"
#include "gate_op.h"

namespace retrieval_attention {
namespace cuda {
namespace {

constexpr int kForwardThreads = 128;
constexpr int kForwardBlocksPerSm = 8;
constexpr int kForwardSums = 3;  // h^2, k^2, h*k*w

template <typename scalar_t, int kVec, bool kHasWeight, bool kResidual>
__global__ void __launch_bounds__(kForwardThreads) gate_forward_kernel(const GateForwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kForwardSums * (kForwardThreads / kWarpSize)];
  const GateForwardPointers<scalar_t> ptr(p);
  const int64_t rows = p.N * p.G;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * kVec;
  constexpr int64_t kStep = static_cast<int64_t>(kForwardThreads) * kVec;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / p.G;
    const int64_t g = row % p.G;
    const scalar_t* hr = ptr.h + n * p.h_stride_n + g * p.h_stride_g;
    const scalar_t* kr = ptr.k + n * p.k_stride_n + g * p.k_stride_g;
    acc_t sums[kForwardSums] = {0, 0, 0};
    for (int64_t d = first; d < p.D; d += kStep) {
      const auto hv = load_pack<scalar_t, kVec>(hr + d);
      const auto kv = load_pack<scalar_t, kVec>(kr + d);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const auto x = static_cast<acc_t>(hv.v[i]);
        const auto y = static_cast<acc_t>(kv.v[i]);
        sums[0] += x * x;
        sums[1] += y * y;
        if constexpr (kHasWeight) {
          sums[2] += x * ptr.w[g * p.D + d + i] * y;
        } else {
          sums[2] += x * y;
        }
      }
    }
    block_sum<kForwardThreads>(sums, smem);
    const RowSums<acc_t> row_sums{sums[0], sums[1], sums[2]};
    const auto st = row_stats<acc_t>(row_sums, p.D, static_cast<acc_t>(p.eps), static_cast<acc_t>(p.scale));
    const bool keep = p.mask == nullptr || p.mask[n];
    const acc_t a = gate_value<acc_t>(st.s, p.options.signed_sqrt, static_cast<acc_t>(p.options.sqrt_clamp), keep);
    if (threadIdx.x == 0) {
      ptr.a[row] = a;
      if (ptr.stats != nullptr) {
        store_stats(ptr.stats, rows, row, st);
      }
    }

    const scalar_t* vr = ptr.v + n * p.v_stride_n;
    scalar_t* orow = ptr.o + row * p.D;
    for (int64_t d = first; d < p.D; d += kStep) {
      const auto vv = load_pack<scalar_t, kVec>(vr + d);
      Pack<scalar_t, kVec> out;
      [[maybe_unused]] Pack<scalar_t, kVec> hv;
      if constexpr (kResidual) {
        hv = load_pack<scalar_t, kVec>(hr + d);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc_t y = a * static_cast<acc_t>(vv.v[i]);
        if constexpr (kResidual) {
          y = static_cast<acc_t>(hv.v[i]) + y;
        }
        out.v[i] = static_cast<scalar_t>(y);
      }
      store_pack<scalar_t, kVec>(orow + d, out);
    }
  }
}

template <typename scalar_t>
void launch_gate_forward(const GateForwardParams& p, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const bool vectorize = can_vectorize(kVec, p.D, {p.h, p.k, p.v, p.o},
                                       {p.h_stride_n, p.h_stride_g, p.k_stride_n, p.k_stride_g, p.v_stride_n});
  const auto blocks = static_cast<unsigned int>(grid_size(p.N * p.G, kForwardBlocksPerSm));
  RA_BOOL_SWITCH(vectorize, kVectorize, [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] {
        gate_forward_kernel<scalar_t, kVectorize ? kVec : 1, kHasWeight, kResidual>
            <<<blocks, kForwardThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace
}  // namespace cuda

GateOutputs gate_forward_cuda(const GateInputs& in, const GateOptions& options) {
  TORCH_CHECK(in.h.is_cuda(), "retrieval_attention.gate: expected `h` on the CUDA device of the other inputs, but got ",
              in.h.device());
  const c10::cuda::CUDAGuard device_guard(in.h.device());
  auto plan = plan_gate_forward(in, options);
  if (plan.params.N == 0) {
    return plan.outputs();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "retrieval_attention::gate (CUDA)",
                                  [&] { cuda::launch_gate_forward<scalar_t>(plan.params, stream); });
  return plan.outputs();
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("gate", TORCH_FN(retrieval_attention::GateSchema::forward<&retrieval_attention::gate_forward_cuda>));
}
