// The CPU kernel of fp8_lookup, compiled once per SIMD capability like the gate's (see
// gate_cpu_kernels.h): its loop over a block is the branch-free decode of common/fp8_math.h, which
// the compiler vectorizes to the capability's width. Only raw pointers cross the boundary.
#pragma once

#include <c10/core/ScalarType.h>

#include "common/fp8_lookup_host.h"

#include <cstdint>

namespace retrieval_attention::cpu {

// Looks up every row of p (in parallel) in the output dtype; returns whether an index is outside
// [0, R), and sets *bad to one such index (its output row is left unwritten: the call raises).
using Fp8LookupKernel = bool (*)(const Fp8LookupParams& p, c10::ScalarType dtype, c10::ScalarType index_dtype,
                                 int64_t* bad);

struct Fp8LookupKernels {
  Fp8LookupKernel lookup;
  const char* capability;
};

namespace DEFAULT {
Fp8LookupKernels fp8_lookup_kernels();
}
#ifdef RA_CPU_AVX2
namespace AVX2 {
Fp8LookupKernels fp8_lookup_kernels();
}
#endif
#ifdef RA_CPU_AVX512
namespace AVX512 {
Fp8LookupKernels fp8_lookup_kernels();
}
#endif

}  // namespace retrieval_attention::cpu
