// The CPU kernel of lookup_backward, compiled once per SIMD capability like the gate's (see
// gate_cpu_kernels.h). Only raw pointers cross the boundary.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace retrieval_attention::cpu {

// The dense table gradient from the grad rows, with the lookups sorted by row (stable).
struct LookupBackwardParams {
  const void* grad;            // [M, dim] contiguous
  const int64_t* sorted_rows;  // [M] the indices in ascending order
  const int64_t* order;        // [M] the position in grad of each sorted index (stable: ascending within a row)
  void* out;                   // [R, dim] contiguous
  int64_t M, R, dim;
};

using LookupBackwardKernel = void (*)(const LookupBackwardParams& p, c10::ScalarType dtype);

struct LookupKernels {
  LookupBackwardKernel backward;
  const char* capability;
};

namespace DEFAULT {
LookupKernels lookup_kernels();
}
#ifdef RA_CPU_AVX2
namespace AVX2 {
LookupKernels lookup_kernels();
}
#endif
#ifdef RA_CPU_AVX512
namespace AVX512 {
LookupKernels lookup_kernels();
}
#endif

}  // namespace retrieval_attention::cpu
