// What the emulated kernel tests check a result with: its largest error against the CPU
// operator's, relative to that result's scale, within a bound per dtype.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

namespace emulated {

// Largest |got - want| allowed, as a fraction of the largest |want|: the kernels and the CPU
// kernels sum in different orders, so float32 and below differ by rounding, float64 by far less.
inline double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 1e-12;
    case at::kFloat:
      return 1e-5;
    case at::kHalf:
      return 4e-3;
    default:
      return 3e-2;  // bfloat16: 8 bits of mantissa
  }
}

inline void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, at::ScalarType dtype) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  if (want.numel() == 0) {
    return;
  }
  const double scale = std::max(want.abs().max().item<double>(), 1e-30);
  const double error = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LE(error, tolerance(dtype) * scale)
      << what << " (" << dtype << "): max error " << error << ", scale " << scale;
}

}  // namespace emulated
