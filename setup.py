"""Builds retrieval_attention with CMake (CMakeLists.txt holds the build): libretrieval_attention and _C,
side by side in the package.

Environment, passed on to CMake:
  FORCE_CUDA=1 / 0        compile the CUDA kernels / never; unset: when nvcc and a CUDA build of torch are both
                          found (never from torch.cuda.is_available(), so a GPU-less CI machine builds them)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX")
  CUDA_HOME               the CUDA toolkit, where the nvcc on PATH is not the one wanted
  MAX_JOBS                parallel compile jobs
  RA_DEBUG=1              a Debug build (-O0 -g)
  RA_SANITIZE=1           AddressSanitizer and UndefinedBehaviorSanitizer in the host C++ (`make test-asan`)
  CMAKE_ARGS              more CMake options, e.g. "-DRA_BUILD_TESTS=ON -DRA_BUILD_EXAMPLES=ON" (`make build`)

The CMake build directory is build_ext's --build-temp: keep it (`make build` uses build/cmake) and a rebuild
compiles only what changed. `build_ext --force` configures and builds from scratch.
"""

from __future__ import annotations

import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = runpy.run_path(str(ROOT / "torch_ext" / "retrieval_attention" / "_version.py"))["__version__"]
FORCE_CUDA_TO_CMAKE = {"1": "ON", "0": "OFF"}


class CMakeExtension(Extension):
    """An extension whose sources CMake knows: setuptools only names its file."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project into the extension's directory."""

    def run(self) -> None:
        # setuptools builds in place by building elsewhere and copying _C alone; CMake writes both files in place.
        self.ra_inplace = self.inplace
        super().run()

    def copy_extensions_to_source(self) -> None:
        """Nothing to copy: an in-place build already wrote the library and _C into the package."""

    def build_extension(self, ext: Extension) -> None:
        if self.ra_inplace:
            package = ext.name.rpartition(".")[0]
            output_dir = Path(self.get_finalized_command("build_py").get_package_dir(package)).resolve()
        else:
            output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("retrieval_attention builds with CMake >= 3.22: pip install cmake ninja")
        build_dir = Path(self.build_temp).resolve()
        if self.force:
            shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DRA_OUTPUT_DIR={output_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if env.get('RA_DEBUG') == '1' else 'Release'}",
            f"-DRA_SANITIZE={'ON' if env.get('RA_SANITIZE') == '1' else 'OFF'}",
            f"-DRA_CUDA={FORCE_CUDA_TO_CMAKE.get(env.get('FORCE_CUDA', ''), 'AUTO')}",
            f"-DTORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', '')}",
            "-DRA_BUILD_TESTS=OFF",
            "-DRA_BUILD_EXAMPLES=OFF",
            *shlex.split(env.get("CMAKE_ARGS", "")),
        ]
        # Configured with the same options already: the build re-runs CMake itself if a CMakeLists.txt changed.
        stamp = build_dir / "setup_py_cmake_args.txt"
        if not stamp.exists() or stamp.read_text() != "\n".join(args):
            configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), *args, *self.generator(build_dir)]
            subprocess.run(configure, check=True)
            stamp.write_text("\n".join(args))
        jobs = [f"--parallel={env['MAX_JOBS']}"] if env.get("MAX_JOBS") else ["--parallel"]
        subprocess.run([cmake, "--build", str(build_dir), *jobs], check=True)

    @staticmethod
    def generator(build_dir: Path) -> list[str]:
        """Ninja where there is one, else CMake's default generator."""
        ninja = _tool("ninja")
        if ninja is None or (build_dir / "CMakeCache.txt").exists():
            return []
        return ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]


def _tool(name: str) -> str | None:
    """A build tool beside this Python (the cmake and ninja packages of its venv), else on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


setup(
    name="retrieval_attention",
    version=VERSION,
    description="Retrieval attention with a sigmoid gate (Engram): fused CPU and CUDA operators for PyTorch",
    package_dir={"": "torch_ext"},
    packages=find_packages("torch_ext"),
    ext_modules=[CMakeExtension("retrieval_attention._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
