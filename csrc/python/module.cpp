// The Python extension module: loading it registers the operators (the rest of csrc/,
// linked into the same library); its own surface is only build_info().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.def(
      "build_info",
      [] {
        const auto info = retrieval_attention::build_info();
        py::dict d;
        d["version"] = info.version;
        d["torch_version"] = info.torch_version;
        d["cpu_capabilities"] = info.cpu_capabilities;
        d["cpu_capability"] = info.cpu_capability;
        d["cuda"] = info.cuda;
        d["cuda_version"] = info.cuda_version;
        d["cuda_archs"] = info.cuda_archs;
        return d;
      },
      "What the compiled library holds: versions, CPU SIMD variants, CUDA architectures.");
}
