"""What the build holds: build_info, one SIMD variant per CPU capability, each exact, none leaking."""

from __future__ import annotations

import collections
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrieval_attention

CAPABILITY_ORDER = ["DEFAULT", "AVX2", "AVX512"]
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_build_info() -> None:
    info = retrieval_attention.build_info()
    assert info["version"] == retrieval_attention.__version__
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["cpu_capabilities"][0] == "DEFAULT"
    assert info["cpu_capability"] in info["cpu_capabilities"]
    if IS_X86:
        assert info["cpu_capabilities"] == CAPABILITY_ORDER
    assert isinstance(info["cuda"], bool)
    assert bool(info["cuda_archs"]) == info["cuda"]


@pytest.mark.parametrize("missing", ["_C*", "libretrieval_attention*"])
def test_missing_extension_says_how_to_build(tmp_path: Path, missing: str) -> None:
    """The package without _C or the library it links: the import error tells how to build them."""
    package = Path(retrieval_attention.__file__).parent
    shutil.copytree(package, tmp_path / "retrieval_attention", ignore=shutil.ignore_patterns(missing, "__pycache__"))
    script = "import retrieval_attention"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "make build" in result.stderr, result.stderr


TESTS = Path(__file__).resolve().parent
# The part of the parity matrix run again per lower capability: every shape (vector tails, D = 1, N = 0)
# and the option combinations (layouts, weights, mask, residual), in every dtype, on the CPU; fp8_lookup
# against the plain-PyTorch dequantization; and the decode step against the existing path in every dtype.
CAPABILITY_SUBSET = (
    "(cpu and (test_shapes or test_option_combinations or test_lookup_matches_reference "
    "or test_fused_step_equals_the_existing_path)) or test_matches_the_reference"
)


def _current_capability() -> str:
    """The capability this run's kernels use: the CPU's best, or lower where ATEN_CPU_CAPABILITY says so."""
    return retrieval_attention.build_info()["cpu_capability"]


@pytest.mark.parametrize("capability", CAPABILITY_ORDER)
def test_each_cpu_capability_matches_reference(capability: str) -> None:
    """The gate's, the short convolution's, fp8_lookup's and the decode step's parity subsets, in a child pytest,
    under each capability below this."""
    if capability not in retrieval_attention.build_info()["cpu_capabilities"]:
        pytest.skip(f"{capability} is not compiled for {platform.machine()}")
    current = _current_capability()
    if capability == current:
        pytest.skip(f"{capability} is what this run uses: the whole suite covers it")
    if CAPABILITY_ORDER.index(capability) > CAPABILITY_ORDER.index(current):
        pytest.skip(f"this run uses {current} (the CPU's best, or ATEN_CPU_CAPABILITY): {capability} is above it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    # The child imports the very library this run does (the sanitized copy under make test-asan).
    pythonpath = f"pythonpath={Path(retrieval_attention.__file__).parents[1]} {TESTS}"
    files = [
        str(TESTS / name)
        for name in ("test_gate_parity.py", "test_short_conv.py", "test_fp8.py", "test_decode_step.py")
    ]
    command = [sys.executable, "-m", "pytest", *files, "-k", CAPABILITY_SUBSET]
    command += ["-o", pythonpath, "-p", "no:cacheprovider", "-rfE"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    output = result.stdout + result.stderr
    assert f"cpu capability {capability}" in output, f"the child did not run {capability}:\n{output}"
    assert result.returncode == 0, output
    assert re.search(r"\b[1-9]\d* passed", output) and " failed" not in output, output


def _registers_by_function(library: str) -> dict[str, set[str]]:
    """SIMD register classes and VEX/EVEX use per function of the disassembled library."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, set[str]] = collections.defaultdict(set)
    function = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ""
        for register in ("xmm", "ymm", "zmm"):
            if f"%{register}" in line:
                found[function].add(register)
        if mnemonic.startswith("v") and "mm" in line:
            found[function].add("vex")
    return found


def _namespace(function: str) -> str:
    for capability in ("AVX512", "AVX2"):
        if f"::{capability}::" in function:
            return capability
    return "baseline"


@pytest.mark.skipif(not IS_X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_simd_variants_hold_vector_code_and_nothing_else_does() -> None:
    """AVX2 kernels use ymm, AVX512 zmm; no code outside them uses a VEX/EVEX instruction.

    The last point keeps the library runnable on a CPU without AVX: an inline function
    compiled in a SIMD variant's file must not be the copy the linker kept for everyone.
    """
    (library,) = Path(retrieval_attention._C.__file__).parent.glob("libretrieval_attention*.so")
    found = _registers_by_function(str(library))
    per_namespace: dict[str, set[str]] = collections.defaultdict(set)
    leaks = []
    for function, registers in found.items():
        space = _namespace(function)
        per_namespace[space] |= registers
        if space == "baseline" and registers & {"ymm", "zmm", "vex"}:
            leaks.append(function)
    assert "ymm" in per_namespace["AVX2"]
    assert "zmm" in per_namespace["AVX512"]
    assert not leaks, f"SIMD instructions outside the capability namespaces: {leaks[:5]}"
