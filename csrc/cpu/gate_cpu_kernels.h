// The CPU kernels of the gate, compiled once per SIMD capability.
//
// csrc/cpu/kernels/*.cpp is built three times on x86-64 (DEFAULT, AVX2, AVX512), each
// time with CPU_CAPABILITY naming the namespace and with that capability's compiler
// flags, as ATen builds its own CPU kernels. The host picks one at run time from
// at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY, so the library runs on
// any x86-64 CPU and a test can force each variant.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include "common/gate_params.h"

#include <string>
#include <type_traits>
#include <vector>

namespace retrieval_attention::cpu {

// float32 rows compute in float64: float32 loses the small scores the signed square root amplifies.
template <typename scalar_t>
using ComputeType = std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

// ComputeType as a dtype: the host allocates the kernels' product weight and weight-gradient sums in it.
constexpr c10::ScalarType compute_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ? c10::ScalarType::Double
                                                                             : c10::ScalarType::Float;
}

// The backward's weight-gradient sum over tokens runs in chunks fixed by N alone (never by
// the thread count), each chunk summing its tokens in order, then the chunks in order:
// the result is bitwise the same for any number of threads.
constexpr int64_t kMinTokensPerChunk = 16;
constexpr int64_t kMaxWeightGradChunks = 64;

inline int64_t weight_grad_chunks(int64_t N) {
  const int64_t chunks = (N + kMinTokensPerChunk - 1) / kMinTokensPerChunk;
  return chunks < kMaxWeightGradChunks ? chunks : kMaxWeightGradChunks;
}

using GateForwardKernel = void (*)(const GateForwardParams&, c10::ScalarType);
using GateBackwardKernel = void (*)(const GateBackwardParams&, c10::ScalarType);

struct GateKernels {
  GateForwardKernel forward;
  GateBackwardKernel backward;
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512", as at::get_cpu_capability() spells it
};

namespace DEFAULT {
GateKernels gate_kernels();
}
#ifdef RA_CPU_AVX2
namespace AVX2 {
GateKernels gate_kernels();
}
#endif
#ifdef RA_CPU_AVX512
namespace AVX512 {
GateKernels gate_kernels();
}
#endif

// The best compiled variant that this CPU and ATEN_CPU_CAPABILITY allow; chosen once.
const GateKernels& selected_gate_kernels();

// The variants compiled into this library, lowest first.
std::vector<std::string> compiled_capabilities();

}  // namespace retrieval_attention::cpu
