"""Float32 accuracy at least PyTorch's, row by row, where the signed square root amplifies errors.

A small run of benchmarks/accuracy_gate.py: every row crafted with a score near zero, D = 4096,
the gate's outputs and gradients against the float64 truth, ours against the float32 eager
reference row by row (the rule of worse is the script's). No time is measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = {"tokens": 64, "G": 4, "D": 4096, "near_zero": 1.0, "chunk": 64, "seed": 7}  # 256 rows near s = 0


@pytest.fixture
def accuracy_gate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import accuracy_gate

    yield accuracy_gate
    sys.modules.pop("accuracy_gate", None)


def test_float32_is_never_worse_than_eager_near_zero_scores(accuracy_gate) -> None:
    cfg = accuracy_gate.Config(**SMALL)
    cmp = accuracy_gate.compare(cfg)
    for name, e in (cmp.row | cmp.weight).items():
        worse = accuracy_gate.worse(e["ours"], e["eager"], e["floor"])
        count = int(worse.sum())
        assert count == 0, (
            f"{name}: ours worse than the float32 eager reference on {count} of {worse.numel()} rows "
            f"(or calls), worst {e['ours'].max().item():.3e} against eager's {e['eager'].max().item():.3e}"
        )
