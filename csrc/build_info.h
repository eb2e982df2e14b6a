// What this build of the library holds, for bug reports and for checking an install.
#pragma once

#include <string>
#include <vector>

namespace retrieval_attention {

struct BuildInfo {
  std::string version;                        // of this library
  std::string torch_version;                  // the torch headers it was compiled against
  std::vector<std::string> cpu_capabilities;  // CPU kernel variants compiled in, lowest first
  std::string cpu_capability;                 // the variant this process runs
  bool cuda = false;                          // CUDA kernels compiled in
  std::string cuda_version;                   // CUDA runtime it was compiled with, "" without CUDA
  std::vector<std::string> cuda_archs;        // SASS architectures compiled, "" without CUDA
};

BuildInfo build_info();

#ifdef RA_WITH_CUDA
namespace cuda {
// Filled in by the CUDA sources, which alone see nvcc's __CUDA_ARCH_LIST__.
void add_build_info(BuildInfo& info);
}  // namespace cuda
#endif

}  // namespace retrieval_attention
