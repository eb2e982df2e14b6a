// CPU host functions of the short convolution (docs/block.md) and their registration at the CPU
// key: checks, the parameters in the accumulation dtype, scratch, and the weight gradients summed
// over b in order. The kernels, one per SIMD capability, are in kernels/short_conv_kernel.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "common/short_conv_host.h"
#include "cpu/capability.h"
#include "cpu/short_conv_cpu_kernels.h"
#include "short_conv.h"

#include <vector>

namespace retrieval_attention {
namespace {

constexpr const char* kForwardOp = "retrieval_attention.short_conv";
constexpr const char* kBackwardOp = "retrieval_attention.short_conv_backward";

const cpu::ShortConvKernels& kernels() {
  static const cpu::ShortConvKernels selected = [] {
    std::vector<cpu::ShortConvKernels> variants{cpu::DEFAULT::short_conv_kernels()};
#ifdef RA_CPU_AVX2
    variants.push_back(cpu::AVX2::short_conv_kernels());
#endif
#ifdef RA_CPU_AVX512
    variants.push_back(cpu::AVX512::short_conv_kernels());
#endif
    return cpu::best_variant(variants);
  }();
  return selected;
}

// The inputs and options as the kernels read them; the tensors keep the buffers alive.
struct Plan {
  cpu::ShortConvParams params{};
  at::Tensor x, taps, norm, scratch;
};

Plan plan(const ShortConvShape& s, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
          double eps, bool residual) {
  Plan pl;
  auto& p = pl.params;
  p.B = s.B;
  p.T = s.T;
  p.G = s.G;
  p.D = s.D;
  p.K = s.K;
  p.dilation = s.dilation;
  p.eps = eps;
  p.residual = residual;
  const auto acc = acc_dtype(x.scalar_type());
  pl.x = x.contiguous();
  pl.taps = weight.to(acc).reshape({s.G, s.D, s.K}).transpose(1, 2).contiguous();  // [G, K, D]
  pl.norm = norm_weight.to(acc).contiguous();
  p.scratch_per_thread = cpu::short_conv_scratch_per_thread(s.D, p.context());
  pl.scratch = at::empty({at::get_num_threads(), p.scratch_per_thread}, x.options().dtype(acc));
  p.x = pl.x.data_ptr();
  p.taps = pl.taps.data_ptr();
  p.norm = pl.norm.data_ptr();
  p.scratch = pl.scratch.data_ptr();
  return pl;
}

}  // namespace

at::Tensor short_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                          int64_t dilation, double eps, bool residual) {
  const auto s = check_short_conv(kForwardOp, x, weight, norm_weight, dilation, eps);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) {
    return y;
  }
  auto pl = plan(s, x, weight, norm_weight, eps, residual);
  pl.params.out = y.data_ptr();
  kernels().forward(pl.params, x.scalar_type());
  return y;
}

ShortConvGradients short_conv_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& norm_weight, int64_t dilation, double eps, bool residual) {
  const auto s = check_short_conv(kBackwardOp, x, weight, norm_weight, dilation, eps);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), kBackwardOp,
                   ": expected `grad_y` to have the dtype of `x` (", x.scalar_type(), "), but got ",
                   grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), kBackwardOp, ": expected `grad_y` of the shape of `x` ", x.sizes(),
                    ", but got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), kBackwardOp, ": expected `grad_y` on the device of `x` (", x.device(),
              "), but got ", grad_y.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros(norm_weight.sizes(), norm_weight.options())};
  }
  auto pl = plan(s, x, weight, norm_weight, eps, residual);
  const at::Tensor gy = grad_y.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor partials = at::empty({s.B, s.G, s.K + 1, s.D}, x.options().dtype(acc));
  pl.params.grad_y = gy.data_ptr();
  pl.params.out = grad_x.data_ptr();
  pl.params.partials = partials.data_ptr();
  kernels().backward(pl.params, x.scalar_type());
  // Over b in order, one add at a time: the same bits for any thread count.
  at::Tensor sums = partials[0].clone();
  for (int64_t b = 1; b < s.B; ++b) {
    sums.add_(partials[b]);
  }
  const at::Tensor grad_weight =
      sums.narrow(1, 0, s.K).transpose(1, 2).reshape({s.G * s.D, 1, s.K}).to(weight.scalar_type());
  const at::Tensor grad_norm = sums.select(1, s.K).to(norm_weight.scalar_type());
  return {grad_x, grad_weight, grad_norm.contiguous()};
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  m.impl("short_conv", TORCH_FN(retrieval_attention::short_conv_cpu));
  m.impl("short_conv_backward", TORCH_FN(retrieval_attention::short_conv_backward_cpu));
}
