"""scripts/gpu_check.sh, the prepared GPU check: without a GPU it stops at its preflight, at once and
leaving the build alone; its sanitizer steps run what they should; ptxas_table.py reads ptxas's lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrieval_attention

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
GPU_CHECK = SCRIPTS / "gpu_check.sh"
NO_GPU_BOUND_S = 90  # a machine without a GPU hears so within this
NO_GPU_EXIT = 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the whole check")
def test_stops_at_preflight_without_a_gpu(tmp_path: Path) -> None:
    package = Path(retrieval_attention.__file__).parent
    libraries = {lib: lib.stat().st_mtime_ns for lib in package.glob("*.so")}
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LD_PRELOAD", None)  # make test-asan's: the preflight imports torch alone, and nvcc needs no ASan
    result = subprocess.run(
        ["bash", str(GPU_CHECK), str(tmp_path)], env=env, capture_output=True, text=True, timeout=NO_GPU_BOUND_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == NO_GPU_EXIT, output
    summary = (tmp_path / "summary.md").read_text()
    assert "no gpu" in summary.lower(), summary
    assert "cuda_available: 0" in summary, summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.md"]
    # The preflight comes before the rebuild, which deletes the in-place library first.
    assert {lib: lib.stat().st_mtime_ns for lib in package.glob("*.so")} == libraries


def test_script_syntax() -> None:
    result = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck() -> None:
    result = subprocess.run(["shellcheck", str(GPU_CHECK)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sanitizer_steps_run_the_case_without_the_caching_allocator() -> None:
    """Every compute-sanitizer run goes through sanitize(), which turns the caching allocator off."""
    text = GPU_CHECK.read_text()
    body = re.search(r"^sanitize\(\) \{\n(.*?)^\}$", text, re.MULTILINE | re.DOTALL)
    assert body is not None, "gpu_check.sh has no sanitize() function"
    assert "env PYTORCH_NO_CUDA_MEMORY_CACHING=1" in body.group(1)
    assert '"$sanitizer" --tool "$tool"' in body.group(1) and "scripts/sanitizer_case.py" in body.group(1)
    assert text.count("--tool") == 1
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        assert re.search(rf"^\s*sanitize {tool} ", text, re.MULTILINE), tool


def test_sanitizer_case_reaches_ngram_hash() -> None:
    assert "retrieval_attention.ngram_hash(" in (SCRIPTS / "sanitizer_case.py").read_text()


def test_sanitizer_case_runs_short_conv_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its short_conv step, pointed at the CPU, runs the forward and the backward of every case."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import sanitizer_case

    monkeypatch.setattr(sanitizer_case, "DEVICE", "cpu")
    calls = []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    for shape in sanitizer_case.SHORT_CONV_CASES:
        sanitizer_case.run_short_conv(shape, torch.float32, torch.float32)
    assert len(calls) == len(sanitizer_case.SHORT_CONV_CASES)


def test_sanitizer_case_runs_fp8_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its fp8_lookup step, pointed at the CPU, looks up each table (contiguous, strided) and no index."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import sanitizer_case

    monkeypatch.setattr(sanitizer_case, "DEVICE", "cpu")
    calls = []
    real = retrieval_attention.fp8_lookup
    monkeypatch.setattr(retrieval_attention, "fp8_lookup", lambda *a, **k: calls.append(a[2].numel()) or real(*a, **k))
    sanitizer_case.run_fp8_lookup(64, torch.bfloat16)
    assert calls == [64, 64, 0] * len(sanitizer_case.FP8_CASES)


PTXAS_LINES = """\
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    16 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 16 bytes cumulative stack size, 48 bytes smem
ptxas info    : Compile time = 30.000 ms
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers
"""


def test_ptxas_table(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("[1/2] Building CUDA object x.cu.o\n" + PTXAS_LINES)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ptxas_table.py"), str(log)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    demangled = shutil.which("c++filt") is not None
    kernel, other = ("kernel<float>", "other") if demangled else ("_Z6kernelIfEvPT_", "_Z5otherv")
    assert result.stdout.startswith(f"2 kernels; most registers: 40 ({other}); spilling: 1 ({kernel})."), result.stdout
    assert f"| `{kernel}` | sm_90 | 32 | 16 / 24 | 16 | 48 |" in result.stdout
    assert f"| `{other}` | sm_90 | 40 | 0 / 0 | 0 | 0 |" in result.stdout
