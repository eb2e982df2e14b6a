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
  static const cpu::ShortConvKernels selected =
      cpu::best_variant(std::vector<cpu::ShortConvKernels> RA_CPU_VARIANTS(short_conv_kernels));
  return selected;
}

// The shared plan, and one scratch row per thread.
struct Plan {
  cpu::ShortConvCpuParams params{};
  ShortConvPlan shared;
  at::Tensor scratch;
};

Plan plan(const ShortConvShape& s, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
          double eps, bool residual, const at::Tensor& grad_y = at::Tensor()) {
  Plan pl;
  pl.shared = plan_short_conv(s, x, weight, norm_weight, eps, residual, grad_y);
  auto& p = pl.params;
  static_cast<ShortConvParams&>(p) = pl.shared.params;
  p.scratch_per_thread = cpu::short_conv_scratch_per_thread(s.D, s.K, p.context());
  pl.scratch = at::empty({at::get_num_threads(), p.scratch_per_thread}, x.options().dtype(acc_dtype(x.scalar_type())));
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
  check_short_conv_grad(kBackwardOp, grad_y, x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros(norm_weight.sizes(), norm_weight.options())};
  }
  auto pl = plan(s, x, weight, norm_weight, eps, residual, grad_y);
  at::Tensor partials = at::empty({s.B, s.G, s.K + 1, s.D}, x.options().dtype(acc_dtype(x.scalar_type())));
  pl.params.out = grad_x.data_ptr();
  pl.params.partials = partials.data_ptr();
  kernels().backward(pl.params, x.scalar_type());
  // Over b in order, one add at a time: the same bits for any thread count.
  at::Tensor sums = partials[0].clone();
  for (int64_t b = 1; b < s.B; ++b) {
    sums.add_(partials[b]);
  }
  return short_conv_gradients(grad_x, sums, s, weight, norm_weight);
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  m.impl("short_conv", TORCH_FN(retrieval_attention::short_conv_cpu));
  m.impl("short_conv_backward", TORCH_FN(retrieval_attention::short_conv_backward_cpu));
}
