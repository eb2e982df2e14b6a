// The CPU kernels of the short convolution, compiled once per SIMD capability like the gate's
// (see gate_cpu_kernels.h). Only raw pointers cross the boundary; scratch comes from the host.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace retrieval_attention::cpu {

struct ShortConvParams {
  int64_t B, T, G, D, K, dilation;
  double eps;
  bool residual;
  const void* x;       // [B, T, G, D] contiguous
  const void* grad_y;  // [B, T, G, D] contiguous (backward)
  void* out;           // y (forward) or grad_x (backward), [B, T, G, D] contiguous
  const void* taps;    // [G, K, D] acc, tap-major so the loops over D are contiguous
  const void* norm;    // [G, D] acc
  void* partials;      // [B * G, K + 1, D] acc (backward): taps' then the norm weight's gradient per sequence
  void* scratch;       // [threads, scratch_per_thread(...)] acc
  int64_t scratch_per_thread;

  int64_t context() const { return (K - 1) * dilation; }
};

// Accumulators one thread needs: two rings of context + 1 rows, their 1 / rms, and one row.
inline int64_t short_conv_scratch_per_thread(int64_t D, int64_t context) {
  return 2 * (context + 1) * D + (context + 1) + D;
}

using ShortConvKernel = void (*)(const ShortConvParams&, c10::ScalarType);

struct ShortConvKernels {
  ShortConvKernel forward;
  ShortConvKernel backward;
  const char* capability;
};

namespace DEFAULT {
ShortConvKernels short_conv_kernels();
}
#ifdef RA_CPU_AVX2
namespace AVX2 {
ShortConvKernels short_conv_kernels();
}
#endif
#ifdef RA_CPU_AVX512
namespace AVX512 {
ShortConvKernels short_conv_kernels();
}
#endif

}  // namespace retrieval_attention::cpu
