// CPU host functions of the gate and their registration at the CPU key.
#include <ATen/Version.h>
#include <torch/library.h>

#include "common/gate_host.h"
#include "cpu/gate_cpu_kernels.h"
#include "gate_op.h"

#include <string>

namespace retrieval_attention {
namespace cpu {
namespace {

int capability_rank(const std::string& name) {
  if (name == "AVX512") {
    return 2;
  }
  return name == "AVX2" ? 1 : 0;
}

GateKernels select_kernels() {
  // at::get_cpu_capability() is what ATen itself dispatches on (ATEN_CPU_CAPABILITY included).
  const int allowed = capability_rank(at::get_cpu_capability());
  GateKernels best = DEFAULT::gate_kernels();
#ifdef RA_CPU_AVX2
  if (allowed >= capability_rank("AVX2")) {
    best = AVX2::gate_kernels();
  }
#endif
#ifdef RA_CPU_AVX512
  if (allowed >= capability_rank("AVX512")) {
    best = AVX512::gate_kernels();
  }
#endif
  (void)allowed;
  return best;
}

}  // namespace

const GateKernels& selected_gate_kernels() {
  static const GateKernels kernels = select_kernels();
  return kernels;
}

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> caps{DEFAULT::gate_kernels().capability};
#ifdef RA_CPU_AVX2
  caps.emplace_back(AVX2::gate_kernels().capability);
#endif
#ifdef RA_CPU_AVX512
  caps.emplace_back(AVX512::gate_kernels().capability);
#endif
  return caps;
}

}  // namespace cpu

GateOutputs gate_forward_cpu(const GateInputs& in, const GateOptions& options) {
  auto plan = plan_gate_forward(in, options);
  if (plan.params.N > 0) {
    cpu::selected_gate_kernels().forward(plan.params, plan.dtype);
  }
  return plan.outputs();
}

GateGradients gate_backward_cpu(const GateBackwardInputs& grads, const GateInputs& in, const GateOptions& options) {
  auto plan = plan_gate_backward(grads, in, options);
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
