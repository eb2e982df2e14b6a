// Element math of the short convolution (docs/block.md), shared by its kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace retrieval_attention {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t silu(acc_t z) {
  return z / (acc_t(1) + std::exp(-z));
}

// d SiLU / dz = s * (1 + z * (1 - s)), s = sigmoid(z).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t silu_grad(acc_t z) {
  const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
  return s * (acc_t(1) + z * (acc_t(1) - s));
}

}  // namespace retrieval_attention
