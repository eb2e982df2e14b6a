// The gate operator from C++ (docs/api.md): called through the dispatcher, differentiated through its
// Autograd kernel, its errors, and build_info. Its numbers over every dtype, shape and option are the
// Python parity matrix's (tests/test_gate_parity.py); here one small float64 case checks what only C++
// shows: the forward against the formulas of docs/gate.md in ATen ops, the gradients against central
// differences of the forward, and the Autograd kernel against gate_backward called directly.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "build_info.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Args = std::map<std::string, c10::IValue>;

// tests/tolerances.py's float64 "reference" tolerance, as a fraction of the expected value's largest magnitude.
constexpr double kFloat64Tolerance = 1e-10;
// Central differences in float64 with this step err by ~1e-16 / step relative to the loss: far below this.
constexpr double kFiniteDifferenceStep = 1e-6;
constexpr double kFiniteDifferenceTolerance = 1e-6;

// Calls retrieval_attention::<name> through the dispatcher with its arguments by schema name (the rest take
// their defaults), so the call does not depend on the schema's order; returns the outputs.
std::vector<Tensor> call(const std::string& name, const Args& args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(("retrieval_attention::" + name).c_str(), "");
  const auto& schema = op.schema();
  for (const auto& [arg, value] : args) {
    TORCH_CHECK(schema.argumentIndexWithName(arg).has_value(), name, " has no argument ", arg);
  }
  std::vector<c10::IValue> stack;
  for (const auto& arg : schema.arguments()) {
    const auto it = args.find(arg.name());
    TORCH_CHECK(it != args.end() || arg.default_value().has_value(), name, ": no value for ", arg.name());
    stack.push_back(it != args.end() ? it->second : *arg.default_value());
  }
  op.callBoxed(&stack);
  std::vector<Tensor> outputs;
  for (const auto& value : stack) {
    outputs.push_back(value.toTensor());
  }
  return outputs;
}

// The largest |got - want|, against tolerance * the largest |want|; fails on NaN.
void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tolerance) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double scale = want.abs().max().item<double>();
  const double error = (got.to(at::kDouble) - want).abs().max().item<double>();
  EXPECT_TRUE(error <= tolerance * scale) << what << ": max error " << error << " > " << tolerance << " * " << scale;
}

// One case: h, k [2, 3, G, D]; v [2, 3, D]; both weights, a mask, the residual, and a loss using o and a.
struct Case {
  static constexpr int64_t G = 2, D = 9;
  static constexpr double eps = 1e-6, scale = 0.4, sqrt_clamp = 1e-6;
  Tensor h, k, v, w_q, w_k, mask, grad_o, grad_a;

  Case() {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(20260101);
    const auto opt = at::TensorOptions().dtype(at::kDouble);
    h = at::randn({2, 3, G, D}, gen, opt);
    k = at::randn({2, 3, G, D}, gen, opt);
    v = at::randn({2, 3, D}, gen, opt);
    w_q = 1 + 0.5 * at::randn({G, D}, gen, opt);
    w_k = 1 + 0.5 * at::randn({G, D}, gen, opt);
    mask = (at::arange(6) % 3 != 1).reshape({2, 3});  // every third token masked out
    grad_o = at::randn({2, 3, G, D}, gen, opt);
    grad_a = at::randn({2, 3, G}, gen, opt);
  }

  std::vector<Tensor> inputs() const { return {h, k, v, w_q, w_k}; }

  // The gate on the given h, k, v, w_q, w_k with this case's mask and options.
  std::vector<Tensor> gate(const std::vector<Tensor>& x) const {
    return call("gate", {{"h", x[0]},
                         {"k", x[1]},
                         {"v", x[2]},
                         {"w_q", x[3]},
                         {"w_k", x[4]},
                         {"mask", mask},
                         {"eps", eps},
                         {"scale", scale},
                         {"sqrt_clamp", sqrt_clamp},
                         {"residual", true}});
  }

  double loss(const std::vector<Tensor>& x) const {
    const auto out = gate(x);
    return ((out[0] * grad_o).sum() + (out[1] * grad_a).sum()).item<double>();
  }
};

TEST(GateFromCpp, ForwardMatchesTheFormulas) {
  const Case c;
  const auto out = c.gate(c.inputs());
  const Tensor &o = out[0], &a = out[1], &stats = out[2];
  EXPECT_EQ(o.sizes(), c.h.sizes());
  EXPECT_EQ(a.sizes(), at::IntArrayRef({2, 3, Case::G}));
  EXPECT_EQ(stats.sizes(), at::IntArrayRef({3, 2, 3, Case::G}));
  EXPECT_EQ(o.scalar_type(), at::kDouble);
  EXPECT_EQ(a.scalar_type(), at::kDouble);

  // docs/gate.md in ATen ops, in float64.
  const auto r_q = (c.h.pow(2).mean(-1) + Case::eps).rsqrt(), r_k = (c.k.pow(2).mean(-1) + Case::eps).rsqrt();
  const auto qn = c.h * r_q.unsqueeze(-1) * c.w_q, kn = c.k * r_k.unsqueeze(-1) * c.w_k;
  const auto s = Case::scale * (qn * kn).sum(-1);
  const auto u = s.sign() * s.abs().clamp_min(Case::sqrt_clamp).sqrt();
  const auto want_a = at::sigmoid(u) * c.mask.unsqueeze(-1);
  expect_close("o", o, want_a.unsqueeze(-1) * c.v.unsqueeze(-2) + c.h, kFloat64Tolerance);
  expect_close("a", a, want_a, kFloat64Tolerance);
  const auto kept = c.mask.unsqueeze(-1).expand_as(s);  // the statistics of masked rows are not defined
  expect_close("stats r_q", stats[0].masked_select(kept), r_q.masked_select(kept), kFloat64Tolerance);
  expect_close("stats r_k", stats[1].masked_select(kept), r_k.masked_select(kept), kFloat64Tolerance);
  expect_close("stats s", stats[2].masked_select(kept), s.masked_select(kept), kFloat64Tolerance);
}

TEST(GateFromCpp, AutogradMatchesFiniteDifferencesAndTheBackwardOp) {
  const Case c;
  std::vector<Tensor> leaves;
  for (const auto& t : c.inputs()) {
    leaves.push_back(t.detach().requires_grad_(true));
  }
  const auto out = c.gate(leaves);
  ASSERT_TRUE(out[0].requires_grad() && out[1].requires_grad()) << "the Autograd kernel recorded no graph";
  const auto grads = torch::autograd::grad({out[0], out[1]}, leaves, {c.grad_o, c.grad_a});
  ASSERT_EQ(grads.size(), leaves.size());

  // Each gradient along a random direction, against central differences of the forward.
  const at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const char* names[] = {"h", "k", "v", "w_q", "w_k"};
  for (size_t i = 0; i < leaves.size(); ++i) {
    EXPECT_EQ(grads[i].sizes(), leaves[i].sizes()) << names[i];
    const auto direction = at::randn(leaves[i].sizes(), gen, leaves[i].options());
    auto plus = c.inputs(), minus = c.inputs();
    plus[i] = plus[i] + kFiniteDifferenceStep * direction;
    minus[i] = minus[i] - kFiniteDifferenceStep * direction;
    const double differences = (c.loss(plus) - c.loss(minus)) / (2 * kFiniteDifferenceStep);
    const double along = (grads[i] * direction).sum().item<double>();
    EXPECT_NEAR(along, differences, kFiniteDifferenceTolerance * std::max(1.0, std::abs(differences))) << names[i];
  }

  // The backward operator on the forward's saved a and stats gives the Autograd kernel's gradients, bitwise.
  const auto saved = c.gate(c.inputs());
  const auto direct = call("gate_backward", {{"grad_o", c.grad_o},
                                             {"grad_a", c.grad_a},
                                             {"a", saved[1]},
                                             {"stats", saved[2]},
                                             {"h", c.h},
                                             {"k", c.k},
                                             {"v", c.v},
                                             {"w_q", c.w_q},
                                             {"w_k", c.w_k},
                                             {"mask", c.mask},
                                             {"scale", Case::scale},
                                             {"sqrt_clamp", Case::sqrt_clamp},
                                             {"residual", true}});
  for (size_t i = 0; i < leaves.size(); ++i) {
    EXPECT_TRUE(at::equal(direct[i], grads[i])) << names[i];
  }
}

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

  const auto out = call("gate", {{"h", h}, {"k", k}, {"v", v}, {"w_q", w_q}, {"w_k", w_k}, {"eps", 1e-6}});
  const Tensor &o = out[0], &a = out[1], &stats = out[2];
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

INSTANTIATE_TEST_SUITE_P(Exact, GateZeroScore, ::testing::Values(at::kDouble, at::kFloat),
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
  const Args good{{"h", at::randn({4, 2, 8})}, {"k", at::randn({4, 2, 8})}, {"v", at::randn({4, 8})}};
  const auto message = [&](Args changes) {
    changes.insert(good.begin(), good.end());  // keeps the changed entries
    return error_of([&] { call("gate", changes); });
  };
  for (const bool grad : {false, true}) {  // through the CPU kernel and through the Autograd kernel
    const auto msg = message({{"h", at::randn({4, 2, 8}).set_requires_grad(grad)}, {"k", at::randn({4, 2, 9})}});
    EXPECT_NE(msg.find("`k`"), std::string::npos) << "message: " << msg;
  }
  const std::pair<Args, std::string> cases[] = {
      {{{"v", at::randn({4, 8}, at::kDouble)}}, "`v`"},
      {{{"w_q", at::randn({2, 7})}}, "`w_q`"},
      {{{"mask", at::ones({5}, at::kBool)}}, "`mask`"},
      {{{"eps", -1.0}}, "`eps`"},
  };
  for (const auto& [changes, name] : cases) {
    const auto msg = message(changes);
    EXPECT_NE(msg.find(name), std::string::npos) << "message: " << msg;
  }
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
}

}  // namespace
