// fp8_lookup's CUDA kernel, run on the host by tests/cpp/cuda_emulator.h, against the CPU operator,
// bit for bit: the aligned vector path (widths of 256, 64 and 8 columns, so 32, 8 and 1 lanes per
// row) and the element path (a width and a block not multiples of 8, a table not 8-byte aligned),
// every output dtype, both index dtypes, more rows than the grid's groups (grid-strided).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <gtest/gtest.h>

#include "cuda_emulator.h"
// The emulator first: the kernel below compiles against it.
#include "common/fp8_lookup_host.h"
#include "cuda/fp8_lookup_kernel.cuh"
#include "fp8_lookup.h"

#include <ostream>
#include <string>

namespace {

using at::Tensor;

struct Case {
  std::string name;
  int64_t R, dim, block, N;
  at::ScalarType dtype;
  at::ScalarType index_dtype = at::kLong;
  bool offset_table = false;  // the table starts one byte into its buffer: not 8-byte aligned
};

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class EmulatedFp8Lookup : public testing::TestWithParam<Case> {};

TEST_P(EmulatedFp8Lookup, MatchesTheCpuOperatorBitForBit) {
  const Case& c = GetParam();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(20261130);
  const auto bytes = at::TensorOptions(at::kByte);
  // Every e4m3 byte (NaN too) and every finite scale byte.
  Tensor buffer = at::randint(0, 256, {c.R * c.dim + 1}, gen, bytes);
  Tensor rows = buffer.narrow(0, c.offset_table ? 1 : 0, c.R * c.dim).view({c.R, c.dim}).view(at::kFloat8_e4m3fn);
  Tensor scales = at::randint(0, 255, {c.R, (c.dim + c.block - 1) / c.block}, gen, bytes);
  Tensor indices = at::randint(0, c.R, {c.N}, gen, at::TensorOptions(c.index_dtype));

  const Tensor want = retrieval_attention::fp8_lookup_cpu(rows, scales, indices, c.block, c.dtype);
  auto plan = retrieval_attention::plan_fp8_lookup(rows, scales, indices, c.block, c.dtype);
  EXPECT_EQ(retrieval_attention::cuda::fp8_lookup_aligned(plan.params),
            c.dim % 8 == 0 && c.block % 8 == 0 && !c.offset_table);
  emu::Launcher launch;
  launch.resident_blocks = 2;
  emu::misaligned_accesses = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "emulated fp8_lookup", [&] {
    AT_DISPATCH_INDEX_TYPES(c.index_dtype, "emulated fp8_lookup",
                            [&] { retrieval_attention::cuda::run_fp8_lookup<scalar_t, index_t>(plan.params, launch); });
  });
  EXPECT_EQ(launch.launches, 1);
  EXPECT_EQ(emu::misaligned_accesses.load(), 0);
  // Same bits: the same NaNs, and every other element's bytes (signed zeros included).
  const Tensor got_nan = plan.out.isnan(), want_nan = want.isnan();
  EXPECT_TRUE(at::equal(got_nan, want_nan)) << c.name;
  EXPECT_TRUE(
      at::equal(plan.out.masked_fill(got_nan, 0).view(at::kByte), want.masked_fill(want_nan, 0).view(at::kByte)))
      << c.name;
}

// N rows over 2 resident blocks of 256 threads: with 32 lanes a row, 16 rows a grid pass, so 600
// rows take many passes; with 1 lane, 512 a pass.
INSTANTIATE_TEST_SUITE_P(Fp8Lookup, EmulatedFp8Lookup,
                         testing::Values(Case{"dim256_block32_bf16", 40, 256, 32, 600, at::kBFloat16},
                                         Case{"dim256_block128_float32_int32", 40, 256, 128, 600, at::kFloat, at::kInt},
                                         Case{"dim64_block32_float16", 40, 64, 32, 600, at::kHalf},
                                         Case{"dim64_block32_float64", 40, 64, 32, 300, at::kDouble},
                                         Case{"dim8_block8_bf16", 40, 8, 8, 1100, at::kBFloat16},
                                         Case{"dim50_block32_element_path", 40, 50, 32, 300, at::kBFloat16},
                                         Case{"dim24_block12_element_path", 40, 24, 12, 300, at::kFloat},
                                         Case{"unaligned_table_element_path", 40, 64, 32, 300, at::kBFloat16, at::kLong,
                                              true}),
                         case_name);

}  // namespace
