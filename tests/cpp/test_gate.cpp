// The gate operator (SPEC §2, §2b) from C++: called through the dispatcher, differentiated
// through its Autograd kernel, and checked against SPEC's formulas written out as plain loops in
// double. Nothing here calls the project's kernels or ATen's rms_norm for an expected value.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "build_info.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The schema of retrieval_attention::gate, spelled out here rather than taken from gate.h.
using GateFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                  const OptTensor&, std::optional<double>, std::optional<double>, bool,
                                                  double, bool, const OptTensor&, bool);

const c10::TypedOperatorHandle<GateFn>& gate_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::gate", "").typed<GateFn>();
  return op;
}

// The op's scalar arguments.
struct Options {
  std::optional<double> eps = 1e-6;
  std::optional<double> scale;
  bool signed_sqrt = true;
  double sqrt_clamp = 1e-6;
  bool residual = false;
};

// The inputs flattened to [N, G, D], as exact double copies of the tensors' values.
struct Problem {
  int64_t N = 0, G = 0, D = 0;
  std::vector<double> h, k, v, w_q, w_k, go, ga;  // w_*: empty without weight; ga: empty without grad into a
  std::vector<bool> mask;                         // empty without mask
  double eps = 0, scale = 0, c = 0;
  bool signed_sqrt = true, residual = false;
};

struct Expected {
  std::vector<double> o, a, r_q, r_k, s;  // forward, and the per-row stats
  std::vector<double> dh, dk, dv, dw_q, dw_k;
};

// SPEC §2 and §2b line by line, in double.
Expected reference(const Problem& p) {
  using T = double;
  const int64_t N = p.N, G = p.G, D = p.D;
  const T eps = p.eps, scale = p.scale, c = p.c, Dt = T(D);
  Expected e;
  e.o.assign(N * G * D, 0);
  e.dh.assign(N * G * D, 0);
  e.dk.assign(N * G * D, 0);
  e.dv.assign(N * D, 0);
  e.a.assign(N * G, 0);
  e.r_q.assign(N * G, 0);
  e.r_k.assign(N * G, 0);
  e.s.assign(N * G, 0);
  e.dw_q.assign(p.w_q.empty() ? 0 : G * D, 0);
  e.dw_k.assign(p.w_k.empty() ? 0 : G * D, 0);
  std::vector<T> x_q(D), x_k(D), qn(D), kn(D);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = n * G + g, base = row * D;
      const auto h = [&](int64_t d) { return T(p.h[base + d]); };
      const auto k = [&](int64_t d) { return T(p.k[base + d]); };
      const auto v = [&](int64_t d) { return T(p.v[n * D + d]); };
      const auto go = [&](int64_t d) { return T(p.go[base + d]); };
      const auto w_q = [&](int64_t d) { return p.w_q.empty() ? T(1) : T(p.w_q[g * D + d]); };
      const auto w_k = [&](int64_t d) { return p.w_k.empty() ? T(1) : T(p.w_k[g * D + d]); };
      if (!p.mask.empty() && !p.mask[n]) {  // a = 0: o = 0 (h with residual), no gradient through the gate
        for (int64_t d = 0; d < D; ++d) {
          e.o[base + d] = p.residual ? h(d) : T(0);
          e.dh[base + d] = p.residual ? go(d) : T(0);
        }
        continue;
      }
      T ss_q = 0, ss_k = 0;
      for (int64_t d = 0; d < D; ++d) {
        ss_q += h(d) * h(d);
        ss_k += k(d) * k(d);
      }
      const T r_q = T(1) / std::sqrt(ss_q / Dt + eps);
      const T r_k = T(1) / std::sqrt(ss_k / Dt + eps);
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        x_q[d] = h(d) * r_q;
        x_k[d] = k(d) * r_k;
        qn[d] = x_q[d] * w_q(d);
        kn[d] = x_k[d] * w_k(d);
        dot += qn[d] * kn[d];
      }
      const T s = scale * dot;
      const T sign = T((s > 0) - (s < 0));
      const T u = p.signed_sqrt ? sign * std::sqrt(std::max(std::abs(s), c)) : s;
      const T a = T(1) / (T(1) + std::exp(-u));
      e.a[row] = a;
      e.r_q[row] = r_q;
      e.r_k[row] = r_k;
      e.s[row] = s;

      T da = p.ga.empty() ? T(0) : T(p.ga[row]);
      for (int64_t d = 0; d < D; ++d) {
        e.o[base + d] = a * v(d) + (p.residual ? h(d) : T(0));
        da += go(d) * v(d);
        e.dv[n * D + d] += a * go(d);
      }
      const T du = da * a * (T(1) - a);
      const T ds = !p.signed_sqrt ? du : (std::abs(s) >= c ? du / (T(2) * std::sqrt(std::abs(s))) : T(0));
      for (int64_t d = 0; d < D; ++d) {
        e.dh[base + d] = r_q * (ds * scale * kn[d] * w_q(d) - x_q[d] * ds * s / Dt) + (p.residual ? go(d) : T(0));
        e.dk[base + d] = r_k * (ds * scale * qn[d] * w_k(d) - x_k[d] * ds * s / Dt);
        if (!p.w_q.empty()) {
          e.dw_q[g * D + d] += ds * scale * kn[d] * x_q[d];
        }
        if (!p.w_k.empty()) {
          e.dw_k[g * D + d] += ds * scale * qn[d] * x_k[d];
        }
      }
    }
  }
  return e;
}

std::vector<double> values(const Tensor& t) {
  const auto flat = t.detach().to(at::kDouble).contiguous().reshape(-1);
  return {flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel()};
}

// SPEC §5: |got - want| <= tol * max|want|.
void expect_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                  double tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (const double w : want) {
    scale = std::max(scale, std::abs(w));
  }
  int failures = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    if (!(err <= tol * scale) && ++failures <= 5) {  // !(<=) so that NaN fails
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", expected " << want[i] << " (error " << err << " > "
                    << tol * scale << ")";
    }
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << got.size() << " elements out of bounds";
}

struct Case {
  std::string name;
  std::vector<int64_t> lead;  // leading dims, flattened to N by the op
  int64_t G, D;
  bool weights = true, residual = false, mask = false, grad_a = false;
  Options options;
  bool float32_weights = false;  // weights in float32 whatever the inputs' dtype
  bool noncontiguous = false;    // h and k as transposed views
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<int64_t> cat(std::vector<int64_t> a, std::initializer_list<int64_t> b) {
  a.insert(a.end(), b);
  return a;
}

// Row (n, g) of t [..., G, D], n counting over the flattened leading dims: a view.
Tensor row_of(Tensor t, int64_t n, int64_t g, const std::vector<int64_t>& lead) {
  for (size_t i = 0; i < lead.size(); ++i) {
    const int64_t stride = c10::multiply_integers(lead.begin() + i + 1, lead.end());
    t = t.select(0, n / stride);
    n %= stride;
  }
  return t.select(0, g);
}

void run_case(const Case& cs, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(std::accumulate(cs.name.begin(), cs.name.end(), 20260101));
  const auto opt = at::TensorOptions().dtype(dtype);
  const auto shape = cat(cs.lead, {cs.G, cs.D}), v_shape = cat(cs.lead, {cs.D}), a_shape = cat(cs.lead, {cs.G});
  const auto randn = [&](at::IntArrayRef size, at::TensorOptions o) { return at::randn(size, gen, o); };
  // Noncontiguous: [..., D, G] leaves seen as [..., G, D].
  const auto view = [&](const Tensor& leaf) { return cs.noncontiguous ? leaf.transpose(-1, -2) : leaf; };
  const auto hk_shape = cs.noncontiguous ? cat(cs.lead, {cs.D, cs.G}) : shape;
  const Tensor h_leaf = randn(hk_shape, opt), k_leaf = randn(hk_shape, opt), v = randn(v_shape, opt);
  const auto w_opt = cs.float32_weights ? opt.dtype(at::kFloat) : opt;
  const OptTensor w_q = cs.weights ? OptTensor(randn({cs.G, cs.D}, w_opt)) : std::nullopt;
  const OptTensor w_k = cs.weights ? OptTensor(randn({cs.G, cs.D}, w_opt)) : std::nullopt;
  OptTensor mask;
  if (cs.mask) {  // every third token masked out
    mask = (at::arange(c10::multiply_integers(cs.lead)) % 3 != 1).reshape(cs.lead);
  }
  const Tensor go = randn(shape, opt), ga = randn(a_shape, opt);

  const auto& o_ = cs.options;
  Problem p;
  p.N = c10::multiply_integers(cs.lead);
  p.G = cs.G;
  p.D = cs.D;
  if (cs.weights) {
    p.w_q = values(*w_q);
    p.w_k = values(*w_k);
  }
  p.v = values(v);
  p.go = values(go);
  if (cs.grad_a) {
    p.ga = values(ga);
  }
  if (mask) {
    for (const double m : values(*mask)) {
      p.mask.push_back(m != 0);
    }
  }
  p.eps = o_.eps.value_or(dtype == at::kDouble ? std::numeric_limits<double>::epsilon()
                                               : double(std::numeric_limits<float>::epsilon()));
  p.scale = o_.scale.value_or(1.0 / std::sqrt(double(cs.D)));
  p.c = o_.sqrt_clamp;
  p.signed_sqrt = o_.signed_sqrt;
  p.residual = o_.residual;

  // A score near 0 makes the gradients ill-conditioned (the sqrt's slope is 1/(2 sqrt|s|), SPEC §5)
  // beyond what float32 knows to 1e-5; GateZeroScore covers s = 0, so redraw h in such rows.
  Expected e;
  for (bool redrawn = true; redrawn;) {
    p.h = values(view(h_leaf));
    p.k = values(view(k_leaf));
    e = reference(p);
    redrawn = false;
    for (int64_t r = 0; r < p.N * p.G; ++r) {
      if (std::abs(e.s[r]) < 0.05 && (p.mask.empty() || p.mask[r / p.G])) {
        row_of(view(h_leaf), r / p.G, r % p.G, cs.lead).copy_(randn({cs.D}, opt));
        redrawn = true;
      }
    }
  }

  for (const auto& t : {h_leaf, k_leaf, v}) {
    t.set_requires_grad(true);
  }
  if (cs.weights) {
    w_q->set_requires_grad(true);
    w_k->set_requires_grad(true);
  }
  const Tensor h = view(h_leaf), k = view(k_leaf);
  auto [o, a, stats] =
      gate_op().call(h, k, v, w_q, w_k, o_.eps, o_.scale, o_.signed_sqrt, o_.sqrt_clamp, o_.residual, mask, true);
  EXPECT_EQ(o.sizes(), at::IntArrayRef(shape));
  EXPECT_EQ(a.sizes(), at::IntArrayRef(a_shape));
  std::vector<int64_t> stats_shape{3};
  stats_shape.insert(stats_shape.end(), a_shape.begin(), a_shape.end());
  EXPECT_EQ(stats.sizes(), at::IntArrayRef(stats_shape));
  EXPECT_EQ(o.scalar_type(), dtype);
  EXPECT_EQ(a.scalar_type(), dtype);  // float32 for float32, float64 for float64
  ASSERT_TRUE(o.requires_grad() && a.requires_grad()) << "the Autograd kernel recorded no graph";

  std::vector<Tensor> inputs{h, k, v};
  if (cs.weights) {
    inputs.push_back(*w_q);
    inputs.push_back(*w_k);
  }
  const auto grads =
      cs.grad_a ? torch::autograd::grad({o, a}, inputs, {go, ga}) : torch::autograd::grad({o}, inputs, {go});
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_TRUE(grads[i].defined()) << "gradient " << i;
    EXPECT_EQ(grads[i].sizes(), inputs[i].sizes()) << "gradient " << i;
    EXPECT_EQ(grads[i].scalar_type(), inputs[i].scalar_type()) << "gradient " << i;
  }

  const double tol = dtype == at::kFloat ? 1e-5 : 1e-10;
  // Float32 weights get float32 gradients: rounded to float32 even for float64 inputs.
  const double w_tol = cs.float32_weights ? std::max(tol, 1e-6) : tol;
  expect_close("o", values(o), e.o, tol);
  expect_close("a", values(a), e.a, tol);
  // The stats r_q, r_k, s of the unmasked rows.
  const auto st = values(stats);
  const int64_t rows = p.N * p.G;
  const std::vector<double>* want_stats[] = {&e.r_q, &e.r_k, &e.s};
  for (int j = 0; j < 3; ++j) {
    std::vector<double> got, want;
    for (int64_t r = 0; r < rows; ++r) {
      if (p.mask.empty() || p.mask[r / p.G]) {
        got.push_back(st[j * rows + r]);
        want.push_back((*want_stats[j])[r]);
      }
    }
    expect_close("stats[" + std::to_string(j) + "]", got, want, tol);
  }
  expect_close("grad h", values(grads[0]), e.dh, tol);
  expect_close("grad k", values(grads[1]), e.dk, tol);
  expect_close("grad v", values(grads[2]), e.dv, tol);
  if (cs.weights) {
    expect_close("grad w_q", values(grads[3]), e.dw_q, w_tol);
    expect_close("grad w_k", values(grads[4]), e.dw_k, w_tol);
  }
}

Options with(std::function<void(Options&)> f) {
  Options o;
  f(o);
  return o;
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = [] {
    std::vector<Case> c;
    c.push_back({.name = "Plain", .lead = {5}, .G = 1, .D = 8});
    c.push_back({.name = "BranchesOddD", .lead = {4}, .G = 3, .D = 7, .grad_a = true});
    c.push_back({.name = "NoWeights", .lead = {6}, .G = 2, .D = 5, .weights = false});
    c.push_back({.name = "ResidualMask",
                 .lead = {2, 3},
                 .G = 2,
                 .D = 9,
                 .mask = true,
                 .grad_a = true,
                 .options = with([](Options& o) { o.residual = true; })});
    // D = 1: a large eps keeps the normalized value away from +-1, where its gradient vanishes.
    c.push_back({.name = "D1MaskNoWeights",
                 .lead = {4},
                 .G = 3,
                 .D = 1,
                 .weights = false,
                 .mask = true,
                 .options = with([](Options& o) { o.eps = 0.5; })});
    c.push_back({.name = "PlainSigmoidScaleDefaultEps",
                 .lead = {7},
                 .G = 4,
                 .D = 16,
                 .grad_a = true,
                 .options = with([](Options& o) {
                   o.signed_sqrt = false;
                   o.scale = 0.5;
                   o.eps = std::nullopt;
                 })});
    c.push_back({.name = "Float32WeightsResidual",
                 .lead = {5},
                 .G = 2,
                 .D = 33,
                 .options = with([](Options& o) { o.residual = true; }),
                 .float32_weights = true});
    c.push_back({.name = "NonContiguous", .lead = {3, 2}, .G = 2, .D = 12, .grad_a = true, .noncontiguous = true});
    // Enough tokens that the weight gradients are summed in several chunks.
    c.push_back({.name = "ManyTokensMask", .lead = {37}, .G = 2, .D = 64, .mask = true});
    return c;
  }();
  return all;
}

class GateTest : public ::testing::TestWithParam<std::tuple<Case, at::ScalarType>> {};

TEST_P(GateTest, ForwardAndBackwardMatchSpec) {
  const auto& [cs, dtype] = GetParam();
  run_case(cs, dtype);
}

INSTANTIATE_TEST_SUITE_P(Spec, GateTest,
                         ::testing::Combine(::testing::ValuesIn(cases()), ::testing::Values(at::kDouble, at::kFloat)),
                         [](const auto& info) {
                           return std::get<0>(info.param).name +
                                  (std::get<1>(info.param) == at::kDouble ? "_float64" : "_float32");
                         });

// h and k with disjoint supports: the score is exactly 0, so u = 0, a = 1/2, and below the
// clamp the gate passes no gradient into h or k.
class GateZeroScore : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(GateZeroScore, GateIsHalfAndNoGradientIntoHK) {
  const auto dtype = GetParam();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto opt = at::TensorOptions().dtype(dtype);
  const int64_t N = 3, G = 2, D = 6;
  auto h = at::randn({N, G, D}, gen, opt);
  auto k = at::randn({N, G, D}, gen, opt);
  const auto even = at::arange(D) % 2 == 0;
  h[1][0].masked_fill_(~even, 0);  // row (1, 0): h on even, k on odd coordinates
  k[1][0].masked_fill_(even, 0);
  h.set_requires_grad(true);
  k.set_requires_grad(true);
  const auto v = at::randn({N, D}, gen, opt).set_requires_grad(true);
  const auto w_q = at::randn({G, D}, gen, opt).set_requires_grad(true);
  const auto w_k = at::randn({G, D}, gen, opt).set_requires_grad(true);
  const auto go = at::randn({N, G, D}, gen, opt);

  auto [o, a, stats] = gate_op().call(h, k, v, w_q, w_k, 1e-6, std::nullopt, true, 1e-6, false, std::nullopt, true);
  EXPECT_EQ(stats[2][1][0].item<double>(), 0.0);
  EXPECT_EQ(a[1][0].item<double>(), 0.5);
  EXPECT_TRUE(at::equal(o[1][0], 0.5 * v[1])) << o[1][0];

  const auto grads = torch::autograd::grad({o}, {h, k, v, w_q, w_k}, {go});
  EXPECT_EQ(grads[0][1][0].abs().max().item<double>(), 0.0) << grads[0][1][0];
  EXPECT_EQ(grads[1][1][0].abs().max().item<double>(), 0.0) << grads[1][1][0];
  // The other rows still get gradients.
  EXPECT_GT(grads[0][1][1].abs().max().item<double>(), 0.0);
  EXPECT_GT(grads[1][0][0].abs().max().item<double>(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Spec, GateZeroScore, ::testing::Values(at::kDouble, at::kFloat),
                         [](const auto& info) { return info.param == at::kDouble ? "float64" : "float32"; });

// The message of the c10::Error that f throws ("" when it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(GateErrors, BadInputNamesTheArgument) {
  const auto h = at::randn({4, 2, 8});
  const auto k = at::randn({4, 2, 8});
  const auto v = at::randn({4, 8});
  const auto call = [](const Tensor& h, const Tensor& k, const Tensor& v, const OptTensor& w_q, double eps,
                       const OptTensor& mask) {
    return [=] { gate_op().call(h, k, v, w_q, std::nullopt, eps, std::nullopt, true, 1e-6, false, mask, true); };
  };
  const auto bad_k = at::randn({4, 2, 9});
  for (const bool grad : {false, true}) {  // through the CPU kernel and through the Autograd kernel
    const auto hh = h.detach().set_requires_grad(grad);
    const auto msg = error_of(call(hh, bad_k, v, std::nullopt, 1e-6, std::nullopt));
    EXPECT_NE(msg.find("`k`"), std::string::npos) << "message: " << msg;
  }
  std::string msg = error_of(call(h, k, v.to(at::kDouble), std::nullopt, 1e-6, std::nullopt));
  EXPECT_NE(msg.find("`v`"), std::string::npos) << "message: " << msg;
  msg = error_of(call(h, k, v, at::randn({2, 7}), 1e-6, std::nullopt));
  EXPECT_NE(msg.find("`w_q`"), std::string::npos) << "message: " << msg;
  msg = error_of(call(h, k, v, std::nullopt, 1e-6, at::ones({5}, at::kBool)));
  EXPECT_NE(msg.find("`mask`"), std::string::npos) << "message: " << msg;
  msg = error_of(call(h, k, v, std::nullopt, -1.0, std::nullopt));
  EXPECT_NE(msg.find("`eps`"), std::string::npos) << "message: " << msg;
}

TEST(BuildInfo, DescribesThisBuild) {
  const auto info = retrieval_attention::build_info();
  EXPECT_EQ(info.version, RA_EXPECTED_VERSION);
  ASSERT_FALSE(info.cpu_capabilities.empty());
  EXPECT_EQ(info.cpu_capabilities.front(), "DEFAULT");
  EXPECT_NE(std::find(info.cpu_capabilities.begin(), info.cpu_capabilities.end(), info.cpu_capability),
            info.cpu_capabilities.end());
  EXPECT_EQ(info.cuda, bool(RA_EXPECTED_CUDA));
  EXPECT_EQ(info.cuda_archs.empty(), !info.cuda);
  // ctest runs the suite again with ATEN_CPU_CAPABILITY set lower: check it took.
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY"); env && std::string(env) == "default") {
    EXPECT_EQ(info.cpu_capability, "DEFAULT");
  } else if (env && std::string(env) == "avx2") {
    EXPECT_NE(info.cpu_capability, "AVX512");  // AVX2, or DEFAULT on a CPU without it
  }
}

}  // namespace
