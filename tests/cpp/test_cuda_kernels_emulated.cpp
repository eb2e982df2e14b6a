// The gate's CUDA kernels, run on the host by tests/cpp/cuda_emulator.h, against the CPU operator.
// Blocks take several tokens and rows (few resident blocks), in every dtype, on the 16-byte and the
// scalar paths, with misaligned and oddly strided views (shifted packs), every option, and shared-memory budgets
// that move the weights and the weight-gradient partial out of shared memory. What only a GPU shows
// (speed, the memory model, the launch itself) is left to scripts/gpu_check.sh.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <gtest/gtest.h>

#include "emulated_checks.h"

#include "cuda_emulator.h"
// The emulator first: the kernels below compile against it.
#include "common/gate_host.h"
#include "cuda/gate_backward_kernel.cuh"
#include "cuda/gate_forward_kernel.cuh"
#include "gate_op.h"

#include <optional>
#include <ostream>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using emulated::expect_close;
using retrieval_attention::GateBackwardInputs;
using retrieval_attention::GateInputs;
using retrieval_attention::GateOptions;

struct Case {
  std::string name;
  at::ScalarType dtype;
  int64_t N, G, D;
  bool w_q = true, w_k = true, mask = false, residual = false, grad_a = true;
  bool misaligned_h = false;  // h starts one element past a 16-byte boundary
  bool strided_k = false;     // k's rows D + 1 apart: off the 16-byte grid
  int64_t resident_blocks = 3;
  size_t shared_budget = 227 * 1024;
};

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Inputs {
  GateInputs in;
  GateOptions options;
  Tensor grad_o, grad_a;
};

Inputs make_inputs(const Case& c) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(20261130);
  const auto opt = at::TensorOptions().dtype(c.dtype);
  const auto randn = [&](at::IntArrayRef shape) { return at::randn(shape, gen, opt.dtype(at::kDouble)).to(c.dtype); };
  Inputs x;
  Tensor h = randn({c.N, c.G, c.D});
  if (c.misaligned_h) {
    h = at::cat({randn({1}), h.flatten()}).narrow(0, 1, h.numel()).view({c.N, c.G, c.D});
  }
  Tensor k = c.strided_k ? randn({c.N, c.G, c.D + 1}).narrow(2, 0, c.D) : randn({c.N, c.G, c.D});
  x.in.h = h;
  x.in.k = k;
  x.in.v = randn({c.N, c.D});
  if (c.w_q) {
    x.in.w_q = 1 + 0.3 * randn({c.G, c.D});
  }
  if (c.w_k) {
    x.in.w_k = 1 + 0.3 * randn({c.G, c.D});
  }
  if (c.mask) {
    x.in.mask = at::arange(c.N) % 3 != 1;
  }
  x.options.residual = c.residual;
  x.options.scale = 0.7;
  x.grad_o = randn({c.N, c.G, c.D});
  x.grad_a = at::randn({c.N, c.G}, gen, opt.dtype(retrieval_attention::acc_dtype(c.dtype)));
  return x;
}

class EmulatedKernels : public testing::TestWithParam<Case> {};

TEST_P(EmulatedKernels, MatchTheCpuOperator) {
  const Case& c = GetParam();
  const Inputs x = make_inputs(c);
  const auto [o, a, stats] = retrieval_attention::call_gate(x.in, x.options);
  const std::optional<Tensor> grad_a = c.grad_a ? std::optional<Tensor>(x.grad_a) : std::nullopt;
  const GateBackwardInputs grads{x.grad_o, grad_a, a, stats};
  const auto want = retrieval_attention::call_gate_backward(grads, x.in, x.options);

  emu::Launcher launch;
  launch.resident_blocks = c.resident_blocks;
  launch.shared_budget = c.shared_budget;
  const int64_t misaligned_before = emu::misaligned_accesses.load();

  auto fwd = retrieval_attention::plan_gate_forward(x.in, x.options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated forward",
                                  [&] { retrieval_attention::cuda::run_gate_forward<scalar_t>(fwd.params, launch); });
  expect_close("o", fwd.o, o, c.dtype);
  expect_close("a", fwd.a, a, c.dtype);
  expect_close("stats", fwd.stats, stats, c.dtype);

  // Twice: the kernels fix every summation order, so the gradients must repeat bit for bit.
  std::vector<Tensor> runs[2];
  for (auto& run : runs) {
    auto bwd = retrieval_attention::plan_gate_backward(grads, x.in, x.options);
    const int64_t vec = c.D % (16 / at::elementSize(c.dtype)) == 0 ? 16 / at::elementSize(c.dtype) : 1;
    const size_t acc = at::elementSize(retrieval_attention::acc_dtype(c.dtype));
    const auto L = acc == 8 ? retrieval_attention::cuda::backward_layout<double>(bwd.params, vec, c.shared_budget)
                            : retrieval_attention::cuda::backward_layout<float>(bwd.params, vec, c.shared_budget);
    EXPECT_LE(L.bytes, c.shared_budget);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated backward", [&] {
      retrieval_attention::cuda::run_gate_backward<scalar_t>(
          bwd.params, launch, [&](int64_t rows) { retrieval_attention::reserve_weight_grad_partials(bwd, rows); });
    });
    const auto got = retrieval_attention::finish_gate_backward(bwd);
    run = {std::get<0>(got), std::get<1>(got), std::get<2>(got), std::get<3>(got), std::get<4>(got)};
  }
  const std::vector<Tensor> expected = {std::get<0>(want), std::get<1>(want), std::get<2>(want), std::get<3>(want),
                                        std::get<4>(want)};
  const char* names[] = {"grad_h", "grad_k", "grad_v", "grad_w_q", "grad_w_k"};
  for (size_t i = 0; i < expected.size(); ++i) {
    expect_close(names[i], runs[0][i], expected[i], c.dtype);
    EXPECT_TRUE(runs[0][i].equal(runs[1][i])) << names[i] << " differs between two runs";
  }
  EXPECT_EQ(emu::misaligned_accesses.load(), misaligned_before) << "a vector access off its alignment";
}

// One case a line (designated initializers: each names what it changes from Case's defaults).
// clang-format off
INSTANTIATE_TEST_SUITE_P(Gate, EmulatedKernels, testing::Values(
    // Several tokens per backward block and rows per forward block, every option on.
    Case{.name = "float64_all_options", .dtype = at::kDouble, .N = 7, .G = 3, .D = 64, .mask = true, .residual = true},
    Case{.name = "float32_vector", .dtype = at::kFloat, .N = 7, .G = 4, .D = 256},
    Case{.name = "bfloat16_vector_residual", .dtype = at::kBFloat16, .N = 8, .G = 4, .D = 256, .residual = true},
    Case{.name = "float16_no_weights_mask", .dtype = at::kHalf, .N = 5, .G = 2, .D = 40, .w_q = false, .w_k = false, .mask = true},
    // The scalar path: D off the pack; G = 5; one weight; no grad_a.
    Case{.name = "float32_scalar_odd_d", .dtype = at::kFloat, .N = 9, .G = 5, .D = 67, .w_k = false, .grad_a = false},
    Case{.name = "bfloat16_scalar_odd_d", .dtype = at::kBFloat16, .N = 6, .G = 5, .D = 37, .w_q = false, .mask = true},
    // Rows off the 16-byte grid (every shift of a pack, and rows of one pack) still load by pack.
    Case{.name = "float32_misaligned_h_strided_k", .dtype = at::kFloat, .N = 7, .G = 3, .D = 64, .residual = true, .misaligned_h = true, .strided_k = true},
    Case{.name = "bfloat16_misaligned_h_strided_k", .dtype = at::kBFloat16, .N = 7, .G = 3, .D = 64, .mask = true, .misaligned_h = true, .strided_k = true},
    Case{.name = "float32_one_pack_rows_misaligned", .dtype = at::kFloat, .N = 7, .G = 3, .D = 4, .misaligned_h = true, .strided_k = true},
    Case{.name = "float16_misaligned_h", .dtype = at::kHalf, .N = 7, .G = 3, .D = 32, .misaligned_h = true},
    // Fewer tokens than blocks, one block, and more blocks than rows.
    Case{.name = "float32_one_token", .dtype = at::kFloat, .N = 1, .G = 2, .D = 64},
    Case{.name = "float64_one_block", .dtype = at::kDouble, .N = 5, .G = 3, .D = 64, .resident_blocks = 1},
    Case{.name = "float32_many_blocks", .dtype = at::kFloat, .N = 4, .G = 3, .D = 64, .resident_blocks = 64},
    // Shared memory that holds the partial but not the weights, then neither (global partial rows).
    Case{.name = "float32_partial_staged_only", .dtype = at::kFloat, .N = 7, .G = 4, .D = 256, .shared_budget = 8 * 1024},
    Case{.name = "float32_nothing_staged", .dtype = at::kFloat, .N = 7, .G = 4, .D = 256, .shared_budget = 3 * 1024},
    Case{.name = "bfloat16_nothing_staged", .dtype = at::kBFloat16, .N = 7, .G = 5, .D = 67, .shared_budget = 2 * 1024}),
    case_name);
// clang-format on

// The layout's own promises: what it puts in shared memory fits the budget, and the G it refuses
// is exactly where the smallest layout stops fitting.
TEST(EmulatedKernels, BackwardLayoutFitsItsBudget) {
  using retrieval_attention::cuda::backward_layout;
  using retrieval_attention::cuda::backward_max_branches;
  for (const size_t budget : {size_t{48 * 1024}, size_t{227 * 1024}}) {
    const int64_t max_g = backward_max_branches<float>(budget);
    EXPECT_GT(max_g, 0);
    for (const int64_t G : {int64_t{1}, int64_t{4}, max_g}) {
      for (const int64_t D : {int64_t{1}, int64_t{7168}, int64_t{65536}}) {
        retrieval_attention::GateBackwardParams p{};
        p.G = G;
        p.D = D;
        p.grad_w = reinterpret_cast<void*>(16);
        const auto L = backward_layout<float>(p, 4, budget);
        EXPECT_LE(L.bytes, budget) << "G " << G << " D " << D;
        EXPECT_GE(L.threads, 32);
        EXPECT_EQ(L.threads % 32, 0);
      }
    }
    retrieval_attention::GateBackwardParams p{};
    p.G = max_g + 1;
    p.D = 1;
    EXPECT_GT(backward_layout<float>(p, 1, budget).bytes, budget);
  }
}

}  // namespace
