// Autocast of the operators: under torch.autocast the activations (the gate's h, k, v, the short
// convolution's x) are cast to the autocast dtype, as nn.Linear's and nn.Conv1d's inputs are;
// float32 weights stay float32 (the kernels accept them with half activations and keep their
// gradients in float32).
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "gate_op.h"
#include "short_conv.h"

namespace retrieval_attention {
namespace {

// A weight in float32 or already in the autocast dtype is kept; any other is cast.
std::optional<at::Tensor> cast_weight(const std::optional<at::Tensor>& w, at::ScalarType dtype,
                                      c10::DeviceType device) {
  if (!w.has_value() || w->scalar_type() == at::kFloat) {
    return w;
  }
  return at::autocast::cached_cast(dtype, *w, device);
}

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
GateOutputs gate_autocast(const GateInputs& in, const GateOptions& options) {
  // Below this key the op runs as usual (autograd included) on the cast tensors.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  // A float64 h is not cast: then nothing is, so the dtypes stay consistent.
  if (!at::autocast::is_autocast_eligible(in.h, kDevice)) {
    return call_gate(in, options);
  }
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  // cached_cast leaves float64 and other devices' tensors alone, as autocast does for nn.Linear.
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  const GateInputs cast_in{
      cast(in.h), cast(in.k), cast(in.v), cast_weight(in.w_q, dtype, kDevice), cast_weight(in.w_k, dtype, kDevice),
      in.mask};
  return call_gate(cast_in, options);
}

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
at::Tensor short_conv_autocast(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight,
                               int64_t dilation, double eps, bool residual) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  if (!at::autocast::is_autocast_eligible(x, kDevice)) {
    return call_short_conv(x, weight, norm_weight, dilation, eps, residual);
  }
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return call_short_conv(at::autocast::cached_cast(dtype, x, kDevice), *cast_weight(weight, dtype, kDevice),
                         *cast_weight(norm_weight, dtype, kDevice), dilation, eps, residual);
}

constexpr auto gate_autocast_cpu = &gate_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
constexpr auto gate_autocast_cuda = &gate_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;

}  // namespace

TORCH_LIBRARY_IMPL(retrieval_attention, AutocastCPU, m) {
  m.impl("gate", TORCH_FN(GateSchema::forward<gate_autocast_cpu>));
  m.impl("short_conv", TORCH_FN((short_conv_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
}

TORCH_LIBRARY_IMPL(retrieval_attention, AutocastCUDA, m) {
  m.impl("gate", TORCH_FN(GateSchema::forward<gate_autocast_cuda>));
  m.impl("short_conv", TORCH_FN((short_conv_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
}

}  // namespace retrieval_attention
