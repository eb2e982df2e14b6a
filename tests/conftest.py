"""Devices, seeds and the per-dtype error summary shared by the tests."""

from __future__ import annotations

import pytest
import torch

from tolerances import WORST

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine"))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter) -> None:
    if WORST:
        terminalreporter.section("worst error against the float64 reference, as a fraction of scale")
        for dtype, err in sorted(WORST.items(), key=lambda kv: str(kv[0])):
            terminalreporter.write_line(f"{dtype!s:>16}: {err:.3e}")
