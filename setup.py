"""Builds retrieval_attention._C: every csrc/ source, CUDA ones when enabled.

Environment:
  FORCE_CUDA=1            compile the CUDA kernels even where no CUDA build of torch is found
  FORCE_CUDA=0            never compile them
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX")
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
  RA_DEBUG=1              -O0 -g
  RA_SANITIZE=1           AddressSanitizer and UndefinedBehaviorSanitizer in the C++ (-O1 -g1 unless RA_DEBUG);
                          `make test-asan` builds such a copy apart, in build/asan

CUDA is enabled by FORCE_CUDA or by finding both nvcc (CUDA_HOME) and a CUDA build of
torch; never by torch.cuda.is_available(), so a GPU-less CI machine builds the CUDA code.
csrc/cpu/kernels/*.cpp are compiled once per CPU capability (DEFAULT, AVX2, AVX512 on
x86-64) with that capability's flags, as ATen compiles its own kernels.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from pathlib import Path


def _find_cuda_home() -> None:
    """Sets CUDA_HOME when torch would guess it wrong.

    torch takes CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script
    (such as /usr/local/bin/nvcc here) the guess has no CUDA headers. Then use the
    conventional /usr/local/cuda, torch's own last resort.
    """
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    guess = Path(nvcc).resolve().parent.parent if nvcc else None
    fallback = Path("/usr/local/cuda")
    if (guess is None or not (guess / "include" / "cuda_runtime.h").exists()) and (
        fallback / "include" / "cuda_runtime.h"
    ).exists():
        os.environ["CUDA_HOME"] = str(fallback)


_find_cuda_home()

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
PACKAGE_DIR = ROOT / "torch_ext"
VERSION = re.search(
    r'__version__ = "([^"]+)"', (PACKAGE_DIR / "retrieval_attention" / "_version.py").read_text()
).group(1)

# Sources built into the per-capability objects, not into the extension directly.
ISA_DIR = CSRC / "cpu" / "kernels"
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    # GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_*): silence that, not our code.
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-Wno-uninitialized",
        "-Wno-maybe-uninitialized",
    ],
}
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cpu_capabilities() -> list[str]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(CPU_CAPABILITY_FLAGS)
    return ["DEFAULT"]


def with_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None:
        return force == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def rel(paths) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


class BuildExtensionPerCapability(BuildExtension):
    """Compiles csrc/cpu/kernels/ once per CPU capability, then links those objects in."""

    def build_extension(self, ext):
        cxx_args = ext.extra_compile_args["cxx"]
        for capability in cpu_capabilities():
            objects = self.compiler.compile(
                rel(ISA_DIR.glob("*.cpp")),
                output_dir=os.path.join(self.build_temp, capability.lower()),
                macros=[*ext.define_macros, ("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)],
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx_args + CPU_CAPABILITY_FLAGS[capability], "nvcc": []},
                depends=ext.depends,
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def make_extension():
    cuda = with_cuda()
    sources = [p for p in CSRC.rglob("*.cpp") if p.parent != ISA_DIR]
    if cuda:
        sources += list(CSRC.rglob("*.cu"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    debug = os.environ.get("RA_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The sanitizers instrument the host C++ only (compute-sanitizer checks the CUDA kernels);
    # a UB report aborts as an ASan one does. -O1 and line tables, as their documentation advises.
    # -fno-wrapv undoes the -fwrapv of Python's CFLAGS, which would define signed overflow and so
    # turn UBSan's check of it off.
    sanitize = os.environ.get("RA_SANITIZE") == "1"
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    sanitizers = [*sanitizers, "-fno-wrapv"] if sanitize else []
    host_opt = ["-O1", "-g1"] if sanitize and not debug else opt
    # Unquoted: quotes do not survive the ninja command line; build_info.cpp stringifies it.
    macros = [("RA_VERSION", VERSION)]
    macros += [(f"RA_CPU_{cap}", None) for cap in cpu_capabilities() if cap != "DEFAULT"]
    if cuda:
        macros.append(("RA_WITH_CUDA", None))
    # at::parallel_for is inline and runs serially unless the caller is compiled with OpenMP;
    # the libgomp it links is the one torch has already loaded.
    openmp = ["-fopenmp"]
    extension = CUDAExtension if cuda else CppExtension
    return extension(
        name="retrieval_attention._C",
        sources=rel(sources),
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args={
            "cxx": [*host_opt, *sanitizers, *openmp, "-Wall", "-Wno-unknown-pragmas"],
            "nvcc": [*opt, "-lineinfo"],
        },
        extra_link_args=[*openmp, *sanitizers],
        depends=rel([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *ISA_DIR.glob("*.cpp")]),
    )


setup(
    name="retrieval_attention",
    version=VERSION,
    description="Retrieval attention with a sigmoid gate (Engram): fused CPU and CUDA operators for PyTorch",
    package_dir={"": "torch_ext"},
    packages=find_packages("torch_ext"),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtensionPerCapability},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
