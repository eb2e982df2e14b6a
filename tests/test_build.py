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


def _supported(capability: str) -> bool:
    best = torch.backends.cpu.get_cpu_capability()
    best = best if best in CAPABILITY_ORDER else "DEFAULT"
    return CAPABILITY_ORDER.index(capability) <= CAPABILITY_ORDER.index(best)


_VARIANT_SCRIPT = """
import sys, dataclasses, torch
sys.path.insert(0, {tests!r})
import retrieval_attention
from gate_cases import Case, check_against_reference
assert retrieval_attention.build_info()["cpu_capability"] == {capability!r}, retrieval_attention.build_info()
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for case in (Case((9,), 3, 131, dtype=dtype), Case((5,), 2, 1000, dtype=dtype, residual=True, mask=True)):
        torch.manual_seed(0)
        check_against_reference(case)
        check_against_reference(dataclasses.replace(case, weights="none", layout="fused_kv"))
print("ok")
"""


@pytest.mark.parametrize("capability", CAPABILITY_ORDER)
def test_each_cpu_capability_matches_reference(capability: str) -> None:
    if capability not in retrieval_attention.build_info()["cpu_capabilities"]:
        pytest.skip(f"{capability} is not compiled for {platform.machine()}")
    if not _supported(capability):
        pytest.skip(f"this CPU cannot run {capability}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    script = _VARIANT_SCRIPT.format(tests=str(Path(__file__).parent), capability=capability)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


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
