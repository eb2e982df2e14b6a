// The CUDA part of build_info(): nvcc alone defines __CUDA_ARCH_LIST__ (e.g. "800,900").
#include <cuda_runtime_api.h>

#include "build_info.h"

#include <sstream>
#include <string>

#define RA_STRINGIFY_IMPL(...) #__VA_ARGS__
#define RA_STRINGIFY(...) RA_STRINGIFY_IMPL(__VA_ARGS__)

namespace retrieval_attention::cuda {

void add_build_info(BuildInfo& info) {
  info.cuda = true;
  info.cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  std::stringstream archs(RA_STRINGIFY(__CUDA_ARCH_LIST__));
  for (std::string arch; std::getline(archs, arch, ',');) {
    // 900 -> "9.0"; the list holds the SASS targets of this compile.
    const int code = std::stoi(arch);
    info.cuda_archs.push_back(std::to_string(code / 100) + "." + std::to_string(code % 100 / 10));
  }
}

}  // namespace retrieval_attention::cuda
