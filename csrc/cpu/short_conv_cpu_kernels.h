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

// A scratch row's stride: D plus a cache line or more, so that rows a page apart do not alias (a
// store to one row stalls the loads of the same column in the rows after it when they are 4 KiB apart).
inline int64_t short_conv_scratch_pitch(int64_t D) {
  constexpr int64_t kPad = 32;  // elements: 128 bytes of float, 256 of double
  return D + kPad;
}

// Accumulators one thread needs: two rings of context + 1 rows, their 1 / rms, one row, and the
// K + 1 rows of one sequence's weight gradients.
inline int64_t short_conv_scratch_per_thread(int64_t D, int64_t K, int64_t context) {
  const int64_t pitch = short_conv_scratch_pitch(D);
  return 2 * (context + 1) * pitch + (context + 1) + pitch + (K + 1) * pitch;
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
