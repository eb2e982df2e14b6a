// CPU host function of the decode step (csrc/decode_step.h) and its registration at the CPU key: the
// shared checks and plan, one scratch row per thread, then the kernel of the best SIMD capability
// (kernels/decode_step_kernel.cpp).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/decode_step_host.h"
#include "cpu/capability.h"
#include "cpu/decode_step_cpu_kernels.h"
#include "cpu/gate_cpu_kernels.h"
#include "decode_step.h"

#include <vector>

namespace retrieval_attention {
namespace {

const cpu::DecodeStepKernels& kernels() {
  static const cpu::DecodeStepKernels selected =
      cpu::best_variant(std::vector<cpu::DecodeStepKernels> RA_CPU_VARIANTS(decode_step_kernels));
  return selected;
}

}  // namespace

DecodeStepOutputs decode_step_cpu(const DecodeStepArgs& args) {
  // The gate's product weight in the CPU gate kernels' compute dtype, so the rows equal the gate operator's.
  const auto plan = plan_decode_step(args, DecodeStepWeights::kPrepared, cpu::compute_dtype(args.gate.h.scalar_type()));
  if (plan.params.gate.N == 0) {
    return plan.outputs();
  }
  cpu::DecodeStepCpuParams p{};
  static_cast<DecodeStepParams&>(p) = plan.params;
  p.scratch_per_thread = p.K;
  const at::Tensor scratch =
      at::empty({at::get_num_threads(), p.scratch_per_thread}, args.gate.h.options().dtype(acc_dtype(plan.gate.dtype)));
  p.scratch = scratch.data_ptr();
  kernels().step(p, plan.gate.dtype);
  return plan.outputs();
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  using retrieval_attention::decode_step_schema;
  m.impl("decode_step", TORCH_FN(decode_step_schema<&retrieval_attention::decode_step_cpu>));
}
