// The decode step's CUDA kernel, run on the host by tests/cpp/cuda_emulator.h, against the CPU operator:
// y, a and the updated state. Engram's K = 4 and dilation 3, one tap (no state), odd D and D over the
// threads, several branches and batches, blocks that take several rows, k and v as views into one
// projection output (rows an odd number of elements apart), no gate weights or w_q alone, float32 parameters beside
// bfloat16 inputs, and B = 0.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <gtest/gtest.h>

#include "emulated_checks.h"

#include "cuda_emulator.h"
// The emulator first: the kernels below compile against it.
#include "common/decode_step_host.h"
#include "cuda/decode_step_kernel.cuh"
#include "decode_step.h"

#include <optional>
#include <ostream>
#include <string>

namespace {

using at::Tensor;
using emulated::expect_close;

struct Case {
  std::string name;
  at::ScalarType dtype;
  int64_t B, G, D, K, dilation;
  bool weights = true;          // the gate's w_q and w_k
  bool only_w_q = false;        // w_q alone (w_k none)
  bool float32_params = false;  // the weights in float32 whatever the inputs' dtype
  int64_t resident_blocks = 3;
};

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Inputs {
  Tensor h, k, v, conv_weight, conv_norm_weight, state;
  std::optional<Tensor> w_q, w_k;
};

Inputs make_inputs(const Case& c) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(20261130);
  const auto randn = [&](at::IntArrayRef shape) { return at::randn(shape, gen, at::TensorOptions(at::kDouble)); };
  const auto params = c.float32_params ? at::kFloat : c.dtype;
  Inputs in;
  in.h = randn({c.B, 1, c.G, c.D}).to(c.dtype);
  // v and k as the block passes them: views into one [B, 1, (G + 1) * D + 1] output, a column to spare.
  const Tensor kv = randn({c.B, 1, (c.G + 1) * c.D + 1}).to(c.dtype);
  in.v = kv.narrow(-1, 0, c.D);
  in.k = kv.narrow(-1, c.D, c.G * c.D).unflatten(-1, {c.G, c.D});
  if (c.weights) {
    in.w_q = (1 + 0.3 * randn({c.G, c.D})).to(params);
    in.w_k = (1 + 0.3 * randn({c.G, c.D})).to(params);
  }
  if (c.only_w_q) {
    in.w_k = std::nullopt;
  }
  in.conv_weight = (0.5 * randn({c.G * c.D, 1, c.K})).to(params);
  in.conv_norm_weight = (1 + 0.3 * randn({c.G, c.D})).to(params);
  in.state = randn({c.B, (c.K - 1) * c.dilation, c.G, c.D}).to(c.dtype);
  return in;
}

class EmulatedDecodeStep : public testing::TestWithParam<Case> {};

TEST_P(EmulatedDecodeStep, MatchesTheCpuOperator) {
  const Case& c = GetParam();
  const Inputs in = make_inputs(c);
  const Tensor cpu_state = in.state.clone(), emu_state = in.state.clone();
  const auto args_of = [&](const Tensor& state) {
    return retrieval_attention::decode_step_args(in.h, in.k, in.v, in.w_q, in.w_k, in.conv_weight, in.conv_norm_weight,
                                                 state, c.dilation, std::nullopt, std::nullopt, true, 1e-6, 1e-5);
  };
  const auto [y, a] = retrieval_attention::decode_step_cpu(args_of(cpu_state));
  const auto args = args_of(emu_state);
  const auto plan = retrieval_attention::plan_decode_step(args, retrieval_attention::DecodeStepWeights::kRaw);
  emu::Launcher launch;
  launch.resident_blocks = c.resident_blocks;
  const int64_t launches_before = launch.launches;
  if (c.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated decode step",
                                    [&] { retrieval_attention::cuda::run_decode_step<scalar_t>(plan.params, launch); });
  }
  EXPECT_EQ(launch.launches - launches_before, c.B > 0 ? 1 : 0) << "one kernel per step";
  const auto [emu_y, emu_a] = plan.outputs();
  expect_close("y", emu_y, y, c.dtype);
  expect_close("a", emu_a, a, c.dtype);
  expect_close("conv_state", emu_state, cpu_state, c.dtype);
  // The state moved up by one row: its old rows 1.. are now rows 0.. bit for bit.
  const int64_t ctx = (c.K - 1) * c.dilation;
  if (ctx > 1) {
    EXPECT_TRUE(emu_state.narrow(1, 0, ctx - 1).equal(in.state.narrow(1, 1, ctx - 1)));
  }
}

// One case a line (designated initializers: each names what it changes from Case's defaults).
// clang-format off
INSTANTIATE_TEST_SUITE_P(DecodeStep, EmulatedDecodeStep, testing::Values(
    Case{.name = "float32_k4_d3", .dtype = at::kFloat, .B = 2, .G = 3, .D = 20, .K = 4, .dilation = 3},
    Case{.name = "float64_k4_d3_one_block", .dtype = at::kDouble, .B = 3, .G = 2, .D = 33, .K = 4, .dilation = 3, .resident_blocks = 1},
    Case{.name = "float64_no_weights_odd", .dtype = at::kDouble, .B = 2, .G = 3, .D = 7, .K = 3, .dilation = 5, .weights = false},
    Case{.name = "bfloat16_float32_params", .dtype = at::kBFloat16, .B = 2, .G = 2, .D = 33, .K = 4, .dilation = 3, .float32_params = true},
    Case{.name = "float64_only_w_q", .dtype = at::kDouble, .B = 2, .G = 2, .D = 12, .K = 4, .dilation = 2, .only_w_q = true},
    Case{.name = "float16_one_tap", .dtype = at::kHalf, .B = 1, .G = 4, .D = 9, .K = 1, .dilation = 2},
    Case{.name = "float32_d_over_threads_more_taps_than_warps", .dtype = at::kFloat, .B = 1, .G = 1, .D = 261, .K = 7, .dilation = 1},
    Case{.name = "float32_empty_batch", .dtype = at::kFloat, .B = 0, .G = 2, .D = 8, .K = 4, .dilation = 3}),
    case_name);
// clang-format on

}  // namespace
