// Host-side checks and preparation of the decode step (csrc/decode_step.h), shared by its backends.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/decode_step_params.h"
#include "common/gate_host.h"
#include "decode_step.h"
#include "gate.h"

#include <optional>

namespace retrieval_attention {

struct DecodeStepPlan {
  GateForwardPlan gate;                      // its o is y
  at::Tensor taps, norm;                     // prepared (acc, taps [G, K, D]), or undefined with raw_params
  at::Tensor w_q, w_k, weight, norm_weight;  // with raw_params: the parameters, contiguous
  DecodeStepParams params;

  DecodeStepOutputs outputs() const { return {gate.o, gate.a}; }
};

// How a backend's kernel reads the parameters.
enum class DecodeStepWeights {
  kPrepared,  // gate.w = w_q * w_k in gate_weight_dtype, taps [G, K, D] and norm in acc (the CPU's SIMD rows)
  kRaw,       // as given (CUDA: the step is then one launch)
};

// Checks every argument before anything is written (the error names it), allocates y and a and fills
// the params. gate_weight_dtype: as plan_gate_forward's weight_dtype (the backend's gate kernels').
DecodeStepPlan plan_decode_step(const DecodeStepArgs& args, DecodeStepWeights weights,
                                std::optional<c10::ScalarType> gate_weight_dtype = std::nullopt);

}  // namespace retrieval_attention
