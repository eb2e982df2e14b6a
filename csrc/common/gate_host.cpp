#include "common/gate_host.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <c10/util/Exception.h>

#include "common/gate_math.h"

#include <cmath>
#include <limits>
#include <vector>

namespace retrieval_attention {
namespace {

constexpr const char* kBackwardOp = "retrieval_attention.gate_backward";

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& h, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == h.scalar_type(), op, ": expected `", name, "` to have the dtype of `h` (",
                   h.scalar_type(), "), but got ", t.scalar_type());
  TORCH_CHECK(t.device() == h.device(), op, ": expected `", name, "` on the device of `h` (", h.device(), "), but got ",
              t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": expected `", name, "` of shape ", shape, ", but got ", t.sizes());
}

struct Shape {
  int64_t N, G, D;
  std::vector<int64_t> lead;  // the leading dims of h, flattened into N
};

// Checks h, k, v, the weights and the mask; returns the canonical sizes.
Shape check_inputs(const char* op, const GateInputs& in) {
  const auto& h = in.h;
  const auto& mask = in.mask;
  TORCH_CHECK_TYPE(is_supported_dtype(h.scalar_type()), op,
                   ": expected `h` to have dtype float32, float64, float16 or bfloat16, but got ", h.scalar_type());
  TORCH_CHECK_VALUE(h.dim() >= 2, op, ": expected `h` of shape [..., G, D], but got ", h.sizes());
  Shape s;
  s.G = h.size(-2);
  s.D = h.size(-1);
  TORCH_CHECK_VALUE(s.G >= 1 && s.D >= 1, op, ": expected `h` of shape [..., G, D] with G >= 1 and D >= 1, but got ",
                    h.sizes());
  s.lead.assign(h.sizes().begin(), h.sizes().end() - 2);
  s.N = 1;
  for (const auto d : s.lead) {
    s.N *= d;
  }
  check_like(op, "k", in.k, h, h.sizes());
  std::vector<int64_t> v_shape = s.lead;
  v_shape.push_back(s.D);
  check_like(op, "v", in.v, h, v_shape);
  check_gate_weight(op, "w_q", in.w_q, h, s.G, s.D);
  check_gate_weight(op, "w_k", in.w_k, h, s.G, s.D);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": expected `mask` of dtype bool, but got ",
                     mask->scalar_type());
    TORCH_CHECK(mask->device() == h.device(), op, ": expected `mask` on the device of `h` (", h.device(), "), but got ",
                mask->device());
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(s.lead), op, ": expected `mask` of shape ",
                      at::IntArrayRef(s.lead), " (the leading dims of `h`), but got ", mask->sizes());
  }
  return s;
}

// A [N, G, D] view whose rows are contiguous in D (a copy only when they are not).
at::Tensor row_view(const at::Tensor& t, int64_t N, int64_t G, int64_t D) {
  auto r = t.reshape({N, G, D});
  return (D > 1 && r.stride(2) != 1) ? r.contiguous() : r;
}

at::Tensor token_view(const at::Tensor& t, int64_t N, int64_t D) {
  auto r = t.reshape({N, D});
  return (D > 1 && r.stride(1) != 1) ? r.contiguous() : r;
}

// w_q * w_k in the weight dtype, [G, D] contiguous; undefined when both are None.
at::Tensor product_weight(const std::optional<at::Tensor>& w_q, const std::optional<at::Tensor>& w_k,
                          c10::ScalarType dtype) {
  if (w_q.has_value() && w_k.has_value()) {
    return (w_q->to(dtype) * w_k->to(dtype)).contiguous();
  }
  if (w_q.has_value() || w_k.has_value()) {
    return (w_q.has_value() ? *w_q : *w_k).to(dtype).contiguous();
  }
  return at::Tensor();
}

std::vector<int64_t> with_prefix(int64_t first, const std::vector<int64_t>& rest, int64_t last) {
  std::vector<int64_t> out;
  if (first >= 0) {
    out.push_back(first);
  }
  out.insert(out.end(), rest.begin(), rest.end());
  out.push_back(last);
  return out;
}

// The RMSNorm epsilon resolved from the dtype of h, checked.
double resolve_eps(const char* op, const GateOptions& options, c10::ScalarType dtype) {
  const double eps = options.eps.has_value() ? *options.eps : default_eps(dtype);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": expected `eps` >= 0 and finite, but got ", eps);
  return eps;
}

// Checks the options both directions read; returns the scale resolved.
double check_options(const char* op, const GateOptions& options, int64_t D) {
  const double scale = resolve_scale(options.scale, D);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected a finite `scale`, but got ", scale);
  TORCH_CHECK_VALUE(!options.signed_sqrt || (options.sqrt_clamp > 0 && std::isfinite(options.sqrt_clamp)), op,
                    ": expected `sqrt_clamp` > 0 and finite when `signed_sqrt` is True, but got ", options.sqrt_clamp);
  return scale;
}

// The canonical views both directions read, and their params.
template <typename Plan>
void set_inputs(Plan& plan, const Shape& s, const GateInputs& in, const GateOptions& options, double scale,
                std::optional<c10::ScalarType> weight_dtype) {
  plan.dtype = in.h.scalar_type();
  plan.h = row_view(in.h, s.N, s.G, s.D);
  plan.k = row_view(in.k, s.N, s.G, s.D);
  plan.v = token_view(in.v, s.N, s.D);
  plan.w = product_weight(in.w_q, in.w_k, weight_dtype.value_or(acc_dtype(plan.dtype)));
  plan.mask = in.mask.has_value() ? in.mask->reshape({s.N}).contiguous() : at::Tensor();
  auto& p = plan.params;
  p.N = s.N;
  p.G = s.G;
  p.D = s.D;
  p.h = plan.h.data_ptr();
  p.k = plan.k.data_ptr();
  p.v = plan.v.data_ptr();
  p.w = plan.w.defined() ? plan.w.data_ptr() : nullptr;
  p.mask = plan.mask.defined() ? plan.mask.template data_ptr<bool>() : nullptr;
  p.h_stride_n = plan.h.stride(0);
  p.h_stride_g = plan.h.stride(1);
  p.k_stride_n = plan.k.stride(0);
  p.k_stride_g = plan.k.stride(1);
  p.v_stride_n = plan.v.stride(0);
  p.options = options;
  p.scale = scale;
}

}  // namespace

void check_gate_weight(const char* op, const char* name, const std::optional<at::Tensor>& w, const at::Tensor& h,
                       int64_t G, int64_t D) {
  if (!w.has_value()) {
    return;
  }
  TORCH_CHECK_TYPE(w->scalar_type() == h.scalar_type() || w->scalar_type() == at::kFloat, op, ": expected `", name,
                   "` to have the dtype of `h` (", h.scalar_type(), ") or float32, but got ", w->scalar_type());
  TORCH_CHECK(w->device() == h.device(), op, ": expected `", name, "` on the device of `h` (", h.device(),
              "), but got ", w->device());
  TORCH_CHECK_VALUE(w->dim() == 2 && w->size(0) == G && w->size(1) == D, op, ": expected `", name,
                    "` of shape [G, D] = [", G, ", ", D, "], but got ", w->sizes());
}

bool is_supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

c10::ScalarType acc_dtype(c10::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

double default_eps(c10::ScalarType dtype) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "default_eps",
                                         [&] { return static_cast<double>(std::numeric_limits<scalar_t>::epsilon()); });
}

double resolve_scale(std::optional<double> scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

GateForwardPlan plan_gate_forward(const GateInputs& in, const GateOptions& options,
                                  std::optional<c10::ScalarType> weight_dtype, const char* op) {
  const Shape s = check_inputs(op, in);
  const double eps = resolve_eps(op, options, in.h.scalar_type());
  const double scale = check_options(op, options, s.D);

  GateForwardPlan plan;
  set_inputs(plan, s, in, options, scale, weight_dtype);
  const auto& h = in.h;
  const auto acc = acc_dtype(plan.dtype);
  plan.o = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  plan.a = at::empty(with_prefix(-1, s.lead, s.G), h.options().dtype(acc));
  plan.stats = at::empty(options.save_stats ? with_prefix(kNumStats, s.lead, s.G) : std::vector<int64_t>{0},
                         h.options().dtype(acc));

  auto& p = plan.params;
  p.eps = eps;
  p.o = plan.o.data_ptr();
  p.a = plan.a.data_ptr();
  p.stats = options.save_stats ? plan.stats.data_ptr() : nullptr;
  return plan;
}

GateBackwardPlan plan_gate_backward(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options,
                                    std::optional<c10::ScalarType> weight_dtype) {
  const Shape s = check_inputs(kBackwardOp, in);
  const auto& h = in.h;
  check_like(kBackwardOp, "grad_o", grads.grad_o, h, h.sizes());
  const auto acc = acc_dtype(h.scalar_type());
  const auto row_shape = with_prefix(-1, s.lead, s.G);
  const auto check_acc = [&](const char* name, const at::Tensor& t, const std::vector<int64_t>& shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == acc, kBackwardOp, ": expected `", name, "` of dtype ", acc, ", but got ",
                     t.scalar_type());
    TORCH_CHECK(t.device() == h.device(), kBackwardOp, ": expected `", name, "` on the device of `h` (", h.device(),
                "), but got ", t.device());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), kBackwardOp, ": expected `", name, "` of shape ",
                      at::IntArrayRef(shape), ", but got ", t.sizes());
  };
  if (grads.grad_a.has_value()) {
    check_acc("grad_a", *grads.grad_a, row_shape);
  }
  check_acc("a", grads.a, row_shape);
  check_acc("stats", grads.stats, with_prefix(kNumStats, s.lead, s.G));
  const double scale = check_options(kBackwardOp, options, s.D);

  GateBackwardPlan plan;
  set_inputs(plan, s, in, options, scale, weight_dtype);
  plan.go = row_view(grads.grad_o, s.N, s.G, s.D);
  plan.ga = grads.grad_a.has_value() ? grads.grad_a->contiguous() : at::Tensor();
  plan.a = grads.a.contiguous();
  plan.stats = grads.stats.contiguous();
  plan.w_q = in.w_q;
  plan.w_k = in.w_k;
  const auto contiguous = h.options().memory_format(at::MemoryFormat::Contiguous);
  plan.grad_h = at::empty(h.sizes(), contiguous);
  plan.grad_k = at::empty(in.k.sizes(), contiguous);
  plan.grad_v = at::empty(in.v.sizes(), contiguous);
  if (plan.w.defined()) {
    // Zeros so that N = 0 gives a zero weight gradient without a launch.
    plan.grad_w = at::zeros({s.G, s.D}, h.options().dtype(plan.w.scalar_type()));
  }

  auto& p = plan.params;
  // The statistics hold the norms; a kernel that recomputes them from h and k needs eps.
  p.eps = resolve_eps(kBackwardOp, options, h.scalar_type());
  p.grad_o = plan.go.data_ptr();
  p.grad_a = plan.ga.defined() ? plan.ga.data_ptr() : nullptr;
  p.a = plan.a.data_ptr();
  p.stats = plan.stats.data_ptr();
  p.go_stride_n = plan.go.stride(0);
  p.go_stride_g = plan.go.stride(1);
  p.grad_h = plan.grad_h.data_ptr();
  p.grad_k = plan.grad_k.data_ptr();
  p.grad_v = plan.grad_v.data_ptr();
  p.grad_w = plan.grad_w.defined() ? plan.grad_w.data_ptr() : nullptr;
  p.grad_w_partials = nullptr;
  p.num_partials = 0;
  return plan;
}

void reserve_weight_grad_partials(GateBackwardPlan& plan, int64_t num_partials) {
  if (!plan.grad_w.defined()) {
    return;
  }
  auto& p = plan.params;
  plan.grad_w_partials = at::empty({num_partials, p.G, p.D}, plan.grad_w.options());
  p.grad_w_partials = plan.grad_w_partials.data_ptr();
  p.num_partials = num_partials;
}

GateGradients finish_gate_backward(const GateBackwardPlan& plan) {
  const auto weight_grad = [&](const std::optional<at::Tensor>& self, const std::optional<at::Tensor>& other) {
    if (!self.has_value()) {
      return at::empty({0}, plan.h.options());
    }
    const auto& dW = plan.grad_w;
    return (other.has_value() ? dW * other->to(dW.scalar_type()) : dW).to(self->scalar_type());
  };
  return {plan.grad_h, plan.grad_k, plan.grad_v, weight_grad(plan.w_q, plan.w_k), weight_grad(plan.w_k, plan.w_q)};
}

}  // namespace retrieval_attention
