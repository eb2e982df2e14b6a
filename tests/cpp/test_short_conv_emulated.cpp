// The short convolution's CUDA kernels, run on the host by tests/cpp/cuda_emulator.h, against the CPU
// operator: forward, and backward twice (the same bits each time). Tiles overlapping their taps' rows
// and taps further apart than a tile, sequences shorter than the context, one tap, odd D and D over
// the threads, several branches and batches, blocks that take several tiles and tiles split over
// several blocks, a shared-memory budget that halves the backward's threads, float32 parameters with
// bfloat16 x, residual on and off.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <gtest/gtest.h>

#include "emulated_checks.h"

#include "cuda_emulator.h"
// The emulator first: the kernels below compile against it.
#include "common/gate_host.h"
#include "common/short_conv_host.h"
#include "cuda/short_conv_kernel.cuh"
#include "short_conv.h"

#include <ostream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using emulated::expect_close;

constexpr double kEps = 1e-5;

struct Case {
  std::string name;
  at::ScalarType dtype;
  int64_t B, T, G, D, K, dilation;
  bool residual = true;
  bool float32_params = false;  // taps and norm weight in float32 whatever x's dtype
  int64_t resident_blocks = 3;
  size_t shared_budget = 227 * 1024;
};

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Inputs {
  Tensor x, weight, norm_weight, grad_y;
};

Inputs make_inputs(const Case& c) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(20261130);
  const auto randn = [&](at::IntArrayRef shape) { return at::randn(shape, gen, at::TensorOptions(at::kDouble)); };
  const auto params = c.float32_params ? at::kFloat : c.dtype;
  return {randn({c.B, c.T, c.G, c.D}).to(c.dtype), (0.5 * randn({c.G * c.D, 1, c.K})).to(params),
          (1 + 0.3 * randn({c.G, c.D})).to(params), randn({c.B, c.T, c.G, c.D}).to(c.dtype)};
}

Tensor emulated_forward(const Case& c, const Inputs& in, emu::Launcher& launch) {
  const auto s = retrieval_attention::check_short_conv("test", in.x, in.weight, in.norm_weight, c.dilation, kEps);
  auto pl = retrieval_attention::plan_short_conv(s, in.x, in.weight, in.norm_weight, kEps, c.residual);
  Tensor y = at::empty_like(pl.x);
  pl.params.out = y.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated forward", [&] {
    retrieval_attention::cuda::run_short_conv_forward<scalar_t>(pl.params, launch);
  });
  return y;
}

std::vector<Tensor> emulated_backward(const Case& c, const Inputs& in, emu::Launcher& launch) {
  const auto s = retrieval_attention::check_short_conv("test", in.x, in.weight, in.norm_weight, c.dilation, kEps);
  auto pl = retrieval_attention::plan_short_conv(s, in.x, in.weight, in.norm_weight, kEps, c.residual, in.grad_y);
  Tensor grad_x = at::empty_like(pl.x);
  pl.params.out = grad_x.data_ptr();
  const auto acc = in.x.options().dtype(retrieval_attention::acc_dtype(c.dtype));
  // Garbage, as fresh GPU memory: the kernel must write every partial it sums.
  Tensor partials, sums = at::full({s.G, s.K + 1, s.D}, 7.0, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated backward", [&] {
    retrieval_attention::cuda::run_short_conv_backward<scalar_t>(pl.params, launch, [&](int64_t rows) {
      partials = at::full({rows, s.G, s.K + 1, s.D}, 7.0, acc);
      pl.params.partials = partials.data_ptr();
      return sums.data_ptr();
    });
  });
  const auto [gx, gw, gnw] = retrieval_attention::short_conv_gradients(grad_x, sums, s, in.weight, in.norm_weight);
  return {gx, gw, gnw};
}

class EmulatedShortConv : public testing::TestWithParam<Case> {};

TEST_P(EmulatedShortConv, MatchesTheCpuOperator) {
  const Case& c = GetParam();
  const Inputs in = make_inputs(c);
  const Tensor y = retrieval_attention::short_conv_cpu(in.x, in.weight, in.norm_weight, c.dilation, kEps, c.residual);
  const auto want = retrieval_attention::short_conv_backward_cpu(in.grad_y, in.x, in.weight, in.norm_weight, c.dilation,
                                                                 kEps, c.residual);
  emu::Launcher launch;
  launch.resident_blocks = c.resident_blocks;
  launch.shared_budget = c.shared_budget;
  launch.shared_limit = c.shared_budget;
  const int64_t misaligned_before = emu::misaligned_accesses.load();

  expect_close("y", emulated_forward(c, in, launch), y, c.dtype);
  const std::vector<Tensor> runs[2] = {emulated_backward(c, in, launch), emulated_backward(c, in, launch)};
  const std::vector<Tensor> expected = {std::get<0>(want), std::get<1>(want), std::get<2>(want)};
  const char* names[] = {"grad_x", "grad_weight", "grad_norm_weight"};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(runs[0][i].scalar_type(), expected[i].scalar_type()) << names[i];
    expect_close(names[i], runs[0][i], expected[i], c.dtype);
    EXPECT_TRUE(runs[0][i].equal(runs[1][i])) << names[i] << " differs between two runs";
  }
  EXPECT_EQ(emu::misaligned_accesses.load(), misaligned_before) << "a vector access off its alignment";
}

// One case a line (designated initializers: each names what it changes from Case's defaults).
// clang-format off
INSTANTIATE_TEST_SUITE_P(ShortConv, EmulatedShortConv, testing::Values(
    // Engram's K = 4 and dilation 3: the taps' rows overlap; several branches and batches.
    Case{.name = "float32_k4_d3", .dtype = at::kFloat, .B = 2, .T = 13, .G = 3, .D = 20, .K = 4, .dilation = 3},
    Case{.name = "float64_k4_d3_no_residual", .dtype = at::kDouble, .B = 2, .T = 13, .G = 3, .D = 20, .K = 4, .dilation = 3, .residual = false},
    // Three tiles in one sequence: the forward's blocks take several, the backward splits them over blocks.
    Case{.name = "float64_three_tiles", .dtype = at::kDouble, .B = 1, .T = 70, .G = 1, .D = 12, .K = 4, .dilation = 3},
    Case{.name = "bfloat16_float32_params_odd_d", .dtype = at::kBFloat16, .B = 2, .T = 40, .G = 2, .D = 33, .K = 4, .dilation = 3, .float32_params = true},
    Case{.name = "float16_one_tap", .dtype = at::kHalf, .B = 1, .T = 9, .G = 4, .D = 7, .K = 1, .dilation = 1, .residual = false},
    // Fewer tokens than the context (9 rows).
    Case{.name = "float32_shorter_than_context", .dtype = at::kFloat, .B = 1, .T = 5, .G = 2, .D = 7, .K = 4, .dilation = 3},
    // Taps further apart than a tile (a range of rows per tap); four tiles over three backward blocks (2, 1, 1).
    Case{.name = "float32_wide_dilation", .dtype = at::kFloat, .B = 1, .T = 100, .G = 1, .D = 16, .K = 3, .dilation = 40},
    // More columns than threads: some threads own two.
    Case{.name = "float32_d_over_threads", .dtype = at::kFloat, .B = 1, .T = 8, .G = 1, .D = 130, .K = 2, .dilation = 5, .residual = false},
    // A budget that leaves the backward one warp, and one block for both tiles.
    Case{.name = "float64_one_warp_one_block", .dtype = at::kDouble, .B = 1, .T = 35, .G = 1, .D = 40, .K = 4, .dilation = 3, .resident_blocks = 1, .shared_budget = 24 * 1024}),
    case_name);
// clang-format on

// The backward's layout halves its threads to fit a budget, and says when even one warp does not fit.
TEST(EmulatedShortConv, BackwardLayoutFitsItsBudgetOrSaysSo) {
  using retrieval_attention::cuda::backward_layout;
  const retrieval_attention::ShortConvShape engram{1, 4096, 4, 1024, 4, 3};
  const auto full = backward_layout<float>(engram, 227 * 1024);
  EXPECT_EQ(full.threads, retrieval_attention::cuda::kShortConvThreads);
  EXPECT_TRUE(full.dense);
  const auto small = backward_layout<double>(engram, 24 * 1024);
  EXPECT_EQ(small.threads, 32);
  EXPECT_LE(small.bytes, size_t{24 * 1024});
  const retrieval_attention::ShortConvShape many_taps{1, 4096, 4, 1024, 4096, 64};
  const auto too_big = backward_layout<float>(many_taps, 227 * 1024);
  EXPECT_FALSE(too_big.dense);
  EXPECT_GT(too_big.bytes, size_t{227 * 1024});
}

}  // namespace
