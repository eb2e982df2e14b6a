// CUDA forward and backward of the short convolution: the host functions (checks, device guard,
// allocation, launch on the current stream); the kernels and their launch plans are in short_conv_kernel.cuh.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "common/short_conv_host.h"
#include "cuda/common.cuh"
#include "cuda/short_conv_kernel.cuh"
#include "short_conv.h"

namespace retrieval_attention {
namespace {

constexpr const char* kForwardOp = "retrieval_attention.short_conv";
constexpr const char* kBackwardOp = "retrieval_attention.short_conv_backward";

// The device of x, checked to be a CUDA one.
c10::Device cuda_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected `x` on the CUDA device of the other inputs, but got ", x.device());
  return x.device();
}

// What both directions run under: x's device, the launcher on its current stream, and the backward's
// shared memory within the GPU's, checked in both directions (the forward needs less) so that too many
// taps far apart fail at a model's first call, naming `weight`, rather than as a failed launch.
struct OnDevice {
  OnDevice(const char* op, const ShortConvShape& s, const at::Tensor& x)
      : guard(cuda_device(op, x)), launch(c10::cuda::getCurrentCUDAStream()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "short_conv shared memory", [&] {
      const auto L = cuda::backward_layout<at::opmath_type<scalar_t>>(s, launch.smem_budget());
      TORCH_CHECK_VALUE(L.bytes <= launch.smem_budget(), op, ": the CUDA kernel needs ", L.bytes,
                        " bytes of shared memory for `weight` of K = ", s.K, " taps at dilation ", s.dilation, " in ",
                        x.scalar_type(), ", but the GPU has ", launch.smem_budget(), "; use fewer taps");
    });
  }
  const c10::cuda::CUDAGuard guard;
  cuda::CudaLauncher launch;
};

}  // namespace

at::Tensor short_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                           int64_t dilation, double eps, bool residual) {
  const auto s = check_short_conv(kForwardOp, x, weight, norm_weight, dilation, eps);
  OnDevice on(kForwardOp, s, x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) {
    return y;
  }
  auto pl = plan_short_conv(s, x, weight, norm_weight, eps, residual);
  pl.params.out = y.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "retrieval_attention::short_conv (CUDA)",
                                  [&] { cuda::run_short_conv_forward<scalar_t>(pl.params, on.launch); });
  return y;
}

ShortConvGradients short_conv_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& norm_weight, int64_t dilation, double eps,
                                            bool residual) {
  const auto s = check_short_conv(kBackwardOp, x, weight, norm_weight, dilation, eps);
  check_short_conv_grad(kBackwardOp, grad_y, x);
  OnDevice on(kBackwardOp, s, x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros(norm_weight.sizes(), norm_weight.options())};
  }
  auto pl = plan_short_conv(s, x, weight, norm_weight, eps, residual, grad_y);
  pl.params.out = grad_x.data_ptr();
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor partials, sums = at::empty({s.G, s.K + 1, s.D}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "retrieval_attention::short_conv_backward (CUDA)", [&] {
                                    cuda::run_short_conv_backward<scalar_t>(pl.params, on.launch, [&](int64_t rows) {
                                      partials = at::empty({rows, s.G, s.K + 1, s.D}, acc);
                                      pl.params.partials = partials.data_ptr();
                                      return sums.data_ptr();
                                    });
                                  });
  return short_conv_gradients(grad_x, sums, s, weight, norm_weight);
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("short_conv", TORCH_FN(retrieval_attention::short_conv_cuda));
  m.impl("short_conv_backward", TORCH_FN(retrieval_attention::short_conv_backward_cuda));
}
