// CPU host functions of the gate and their registration at the CPU key.
#include <torch/library.h>

#include "common/gate_host.h"
#include "cpu/capability.h"
#include "cpu/gate_cpu_kernels.h"
#include "gate_op.h"

#include <string>
#include <vector>

namespace retrieval_attention {
namespace cpu {
namespace {

// The compiled variants, lowest first.
std::vector<GateKernels> gate_variants() { return std::vector<GateKernels> RA_CPU_VARIANTS(gate_kernels); }

}  // namespace

const GateKernels& selected_gate_kernels() {
  static const GateKernels kernels = best_variant(gate_variants());
  return kernels;
}

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> caps;
  for (const auto& v : gate_variants()) {
    caps.emplace_back(v.capability);
  }
  return caps;
}

}  // namespace cpu

GateOutputs gate_forward_cpu(const GateInputs& in, const GateOptions& options) {
  auto plan = plan_gate_forward(in, options, cpu::compute_dtype(in.h.scalar_type()));
  if (plan.params.N > 0) {
    cpu::selected_gate_kernels().forward(plan.params, plan.dtype);
  }
  return plan.outputs();
}

GateGradients gate_backward_cpu(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options) {
  auto plan = plan_gate_backward(grads, in, options, cpu::compute_dtype(in.h.scalar_type()));
  if (plan.params.N > 0) {
    reserve_weight_grad_partials(plan, cpu::weight_grad_chunks(plan.params.N));
    cpu::selected_gate_kernels().backward(plan.params, plan.dtype);
  }
  return finish_gate_backward(plan);
}

}  // namespace retrieval_attention

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  using retrieval_attention::GateSchema;
  m.impl("gate", TORCH_FN(GateSchema::forward<&retrieval_attention::gate_forward_cpu>));
  m.impl("gate_backward", TORCH_FN(GateSchema::backward<&retrieval_attention::gate_backward_cpu>));
}
