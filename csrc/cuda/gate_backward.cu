// CUDA backward of the gate: one block per token, grid-strided over tokens, then a small
// kernel that sums the blocks' weight-gradient partials in a fixed order (no atomics).
// Per token: dL/da of each branch (a block sum of go * v), the row coefficients in shared
// memory, then one pass writing dh, dk, dv and adding to the block's own partial row.
// Every thread keeps the same columns for every token, so the partial needs no sync.
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

constexpr int kBackwardThreads = 256;
constexpr int kBackwardBlocksPerSm = 2;
constexpr int kReduceThreads = 256;
constexpr int kReduceBlocksPerSm = 4;
constexpr int kCoeffs = 4;                    // cross, self_q, self_k, a of each branch, in shared memory
constexpr size_t kMaxCoeffBytes = 48 * 1024;  // dynamic shared memory without an opt-in

template <typename scalar_t, int kVec, bool kHasWeight, bool kResidual>
__global__ void __launch_bounds__(kBackwardThreads) gate_backward_kernel(const GateBackwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kBackwardThreads / kWarpSize];
  extern __shared__ __align__(16) unsigned char coeff_bytes[];
  auto* coeff = reinterpret_cast<acc_t*>(coeff_bytes);  // [G, kCoeffs]
  const GateBackwardPointers<scalar_t> ptr(p);
  const int64_t G = p.G, D = p.D, NG = p.N * p.G;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * kVec;
  constexpr int64_t kStep = static_cast<int64_t>(kBackwardThreads) * kVec;
  acc_t* partial = kHasWeight ? ptr.grad_w_partials + blockIdx.x * G * D : nullptr;

  if constexpr (kHasWeight) {
    for (int64_t d = first; d < D; d += kStep) {
      for (int64_t g = 0; g < G; ++g) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          partial[g * D + d + i] = acc_t(0);
        }
      }
    }
  }

  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const scalar_t* vn = ptr.v + n * p.v_stride_n;
    const bool keep = p.mask == nullptr || p.mask[n];
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* gor = ptr.grad_o + n * p.go_stride_n + g * p.go_stride_g;
      acc_t da[1] = {0};
      for (int64_t d = first; d < D; d += kStep) {
        const auto gov = load_pack<scalar_t, kVec>(gor + d);
        const auto vv = load_pack<scalar_t, kVec>(vn + d);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          da[0] += static_cast<acc_t>(gov.v[i]) * static_cast<acc_t>(vv.v[i]);
        }
      }
      block_sum<kBackwardThreads>(da, red);
      if (threadIdx.x == 0) {
        const int64_t row = n * G + g;
        const auto st = load_stats(ptr.stats, NG, row);
        const acc_t a = ptr.a[row];
        const acc_t total = ptr.grad_a != nullptr ? da[0] + ptr.grad_a[row] : da[0];
        const acc_t ds =
            score_grad<acc_t>(total, a, st.s, p.options.signed_sqrt, static_cast<acc_t>(p.options.sqrt_clamp), keep);
        const auto c = row_grad_coeffs<acc_t>(st, ds, static_cast<acc_t>(p.scale), D);
        coeff[g * kCoeffs + 0] = c.cross;
        coeff[g * kCoeffs + 1] = c.self_q;
        coeff[g * kCoeffs + 2] = c.self_k;
        coeff[g * kCoeffs + 3] = a;
      }
    }
    __syncthreads();

    for (int64_t d = first; d < D; d += kStep) {
      acc_t dv_acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dv_acc[i] = acc_t(0);
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t cross = coeff[g * kCoeffs + 0];
        const acc_t self_q = coeff[g * kCoeffs + 1];
        const acc_t self_k = coeff[g * kCoeffs + 2];
        const acc_t a = coeff[g * kCoeffs + 3];
        const auto gov = load_pack<scalar_t, kVec>(ptr.grad_o + n * p.go_stride_n + g * p.go_stride_g + d);
        const auto hv = load_pack<scalar_t, kVec>(ptr.h + n * p.h_stride_n + g * p.h_stride_g + d);
        const auto kv = load_pack<scalar_t, kVec>(ptr.k + n * p.k_stride_n + g * p.k_stride_g + d);
        Pack<scalar_t, kVec> dh_out, dk_out;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const auto x = static_cast<acc_t>(hv.v[i]);
          const auto y = static_cast<acc_t>(kv.v[i]);
          const auto gradient = static_cast<acc_t>(gov.v[i]);
          const acc_t wi = kHasWeight ? ptr.w[g * D + d + i] : acc_t(1);
          acc_t dx = cross * y * wi - self_q * x;
          if constexpr (kResidual) {
            dx += gradient;
          }
          dh_out.v[i] = static_cast<scalar_t>(dx);
          dk_out.v[i] = static_cast<scalar_t>(cross * x * wi - self_k * y);
          if constexpr (kHasWeight) {
            partial[g * D + d + i] += cross * x * y;
          }
          dv_acc[i] += a * gradient;
        }
        const int64_t out = (n * G + g) * D + d;
        store_pack<scalar_t, kVec>(ptr.grad_h + out, dh_out);
        store_pack<scalar_t, kVec>(ptr.grad_k + out, dk_out);
      }
      Pack<scalar_t, kVec> dv_out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dv_out.v[i] = static_cast<scalar_t>(dv_acc[i]);
      }
      store_pack<scalar_t, kVec>(ptr.grad_v + n * D + d, dv_out);
    }
    __syncthreads();  // the coefficients are rewritten for the next token
  }
}

// grad_w[i] = sum over blocks b, in order, of partials[b][i].
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    weight_grad_reduce_kernel(const acc_t* partials, int64_t num_partials, int64_t size, acc_t* grad_w) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kReduceThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < size; i += stride) {
    acc_t total = 0;
    for (int64_t b = 0; b < num_partials; ++b) {
      total += partials[b * size + i];
    }
    grad_w[i] = total;
  }
}

template <typename scalar_t>
void launch_gate_backward(const GateBackwardParams& p, unsigned int blocks, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const bool vectorize = can_vectorize(
      kVec, p.D, {p.grad_o, p.h, p.k, p.v, p.grad_h, p.grad_k, p.grad_v},
      {p.go_stride_n, p.go_stride_g, p.h_stride_n, p.h_stride_g, p.k_stride_n, p.k_stride_g, p.v_stride_n});
  const size_t coeff_bytes = static_cast<size_t>(p.G) * kCoeffs * sizeof(acc_t);
  RA_BOOL_SWITCH(vectorize, kVectorize, [&] {
    RA_BOOL_SWITCH(p.w != nullptr, kHasWeight, [&] {
      RA_BOOL_SWITCH(p.options.residual, kResidual, [&] {
        gate_backward_kernel<scalar_t, kVectorize ? kVec : 1, kHasWeight, kResidual>
            <<<blocks, kBackwardThreads, coeff_bytes, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  if (p.grad_w != nullptr) {
    const int64_t size = p.G * p.D;
    const auto reduce_blocks =
        static_cast<unsigned int>(grid_size((size + kReduceThreads - 1) / kReduceThreads, kReduceBlocksPerSm));
    weight_grad_reduce_kernel<acc_t><<<reduce_blocks, kReduceThreads, 0, stream>>>(
        static_cast<const acc_t*>(p.grad_w_partials), p.num_partials, size, static_cast<acc_t*>(p.grad_w));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda

GateGradients gate_backward_cuda(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options) {
  TORCH_CHECK(in.h.is_cuda(), "retrieval_attention.gate_backward: expected `h` on the CUDA device of the other ",
              "inputs, but got ", in.h.device());
  const c10::cuda::CUDAGuard device_guard(in.h.device());
  auto plan = plan_gate_backward(grads, in, options);
  auto& p = plan.params;
  const size_t coeff_bytes = static_cast<size_t>(p.G) * cuda::kCoeffs * c10::elementSize(acc_dtype(plan.dtype));
  TORCH_CHECK_VALUE(coeff_bytes <= cuda::kMaxCoeffBytes, "retrieval_attention.gate_backward: the CUDA kernel takes ",
                    "at most ", cuda::kMaxCoeffBytes / (cuda::kCoeffs * c10::elementSize(acc_dtype(plan.dtype))),
                    " branches (G), but `h` has ", p.G);
  if (p.N == 0) {
    return finish_gate_backward(plan);
  }
  const auto blocks = static_cast<unsigned int>(cuda::grid_size(p.N, cuda::kBackwardBlocksPerSm));
  // One partial row per block: the sum over tokens is then fixed by N and the SM count.
  reserve_weight_grad_partials(plan, blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "retrieval_attention::gate_backward (CUDA)",
                                  [&] { cuda::launch_gate_backward<scalar_t>(p, blocks, stream); });
  return finish_gate_backward(plan);
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("gate_backward",
         TORCH_FN(retrieval_attention::GateSchema::backward<&retrieval_attention::gate_backward_cuda>));
}
