// The CPU kernels of the short convolution, compiled once per SIMD capability like the gate's
// (see gate_cpu_kernels.h). Only raw pointers cross the boundary; scratch comes from the host.
#pragma once

#include <c10/core/ScalarType.h>

#include "common/short_conv_params.h"

#include <cstdint>

namespace retrieval_attention::cpu {

// The shared parameters (common/short_conv_params.h; partials [B * G, K + 1, D]: the taps' then the
// norm weight's gradient per sequence) and one scratch row per thread.
struct ShortConvCpuParams : ShortConvParams {
  void* scratch;  // [threads, scratch_per_thread(...)] acc
  int64_t scratch_per_thread;
};

// Accumulators one thread needs: two rings of context + 1 rows, their 1 / rms, and one row.
inline int64_t short_conv_scratch_per_thread(int64_t D, int64_t context) {
  return 2 * (context + 1) * D + (context + 1) + D;
}

using ShortConvKernel = void (*)(const ShortConvCpuParams&, c10::ScalarType);

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
