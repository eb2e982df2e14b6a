// The CPU kernels of the decode step, compiled once per SIMD capability like the gate's (see
// gate_cpu_kernels.h). Only raw pointers cross the boundary; scratch comes from the host.
#pragma once

#include <c10/core/ScalarType.h>

#include "common/decode_step_params.h"

#include <cstdint>

namespace retrieval_attention::cpu {

// The shared parameters and one scratch row per thread: the K taps' rows' 1 / rms.
struct DecodeStepCpuParams : DecodeStepParams {
  void* scratch;  // [threads, K] acc
  int64_t scratch_per_thread;
};

using DecodeStepKernel = void (*)(const DecodeStepCpuParams&, c10::ScalarType);

struct DecodeStepKernels {
  DecodeStepKernel step;
  const char* capability;
};

namespace DEFAULT {
DecodeStepKernels decode_step_kernels();
}
#ifdef RA_CPU_AVX2
namespace AVX2 {
DecodeStepKernels decode_step_kernels();
}
#endif
#ifdef RA_CPU_AVX512
namespace AVX512 {
DecodeStepKernels decode_step_kernels();
}
#endif

}  // namespace retrieval_attention::cpu
