#include "build_info.h"

#include <torch/version.h>

#include "cpu/gate_cpu_kernels.h"

#ifndef RA_VERSION
#error "RA_VERSION is defined by the build (setup.py or CMake) from torch_ext/retrieval_attention/_version.py"
#endif

#define RA_STRINGIFY_IMPL(x) #x
#define RA_STRINGIFY(x) RA_STRINGIFY_IMPL(x)

namespace retrieval_attention {

BuildInfo build_info() {
  BuildInfo info;
  info.version = RA_STRINGIFY(RA_VERSION);
  info.torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
  info.cpu_capabilities = cpu::compiled_capabilities();
  info.cpu_capability = cpu::selected_gate_kernels().capability;
#ifdef RA_WITH_CUDA
  cuda::add_build_info(info);
#endif
  return info;
}

}  // namespace retrieval_attention
