"""The gate against the float64 reference: every dtype, shape, option and layout, forward and all gradients.

Each test is one ``GateCase`` of tests/gate_harness.py, compared under the fair bound of docs/accuracy.md.
tests/test_build.py runs a part of this file again under each lower CPU capability.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DEVICES, DTYPES
from gate_harness import GateCase, check, laid_out

SHAPES = [
    ((0,), 2, 8),  # N = 0
    ((5,), 1, 1),  # D = 1
    ((7,), 3, 129),  # odd D
    ((4,), 5, 1000),  # G = 5, D not a multiple of any vector width
    ((2, 3), 2, 33),  # extra leading dims
    ((3, 1, 4), 4, 64),  # three leading dims, one of them 1
    ((40,), 4, 256),  # several weight-gradient chunks
]

NO_WEIGHTS = {"w_q": "none", "w_k": "none"}
FLOAT32_WEIGHTS = {"w_q": "float32", "w_k": "float32"}
BRANCH_MAJOR = {"layouts": laid_out("branch_major", "h", "k")}  # h and k stored [G, *lead, D]
STRIDED = {"layouts": laid_out("strided", "h", "k")}  # every 2nd or 3rd element along D

OPTIONS = {
    "no_weights": NO_WEIGHTS,
    "only_w_q": {"w_k": "none"},
    "only_w_k": {"w_q": "none"},
    "float32_weights": FLOAT32_WEIGHTS,
    "plain_sigmoid": {"signed_sqrt": False},
    "scale_eps": {"scale": 0.37, "eps": 1e-3},
    "residual": {"residual": True},
    "mask": {"mask": True},
    "residual_mask": {"residual": True, "mask": True},
    "branch_major": BRANCH_MAJOR,
    "strided": STRIDED,
    "fused_kv": {"fused_kv": True},
    "only_o_used": {"uses": "o"},
    "only_a_used": {"uses": "a"},
}

# Options together, where one path could undo another (a fused projection with a mask and a
# residual, one weight in float32, strided rows without weights, ...).
COMBINATIONS = [
    {"fused_kv": True, "residual": True, "mask": True, **NO_WEIGHTS},
    {"fused_kv": True, **FLOAT32_WEIGHTS, "signed_sqrt": False},
    {**BRANCH_MAJOR, "residual": True, "w_k": "none", "uses": "o"},
    {**BRANCH_MAJOR, "mask": True, "scale": 2.0, "eps": 0.0},
    {**STRIDED, "w_q": "none", "residual": True, "uses": "a"},
    {**STRIDED, "mask": True, **FLOAT32_WEIGHTS, "eps": 0.5},
    {**NO_WEIGHTS, "signed_sqrt": False, "residual": True, "mask": True},
    {**FLOAT32_WEIGHTS, "residual": True, "mask": True, "scale": 0.05},
]

# Small cases with an eps of 1e-6 (nn.RMSNorm's usual one) rather than the dtype's.
SMALL_CASES = {
    "plain": GateCase((5,), 1, 8, uses="o", eps=1e-6),
    "branches_odd_D": GateCase((4,), 3, 7, eps=1e-6),
    "no_weights": GateCase((6,), 2, 5, **NO_WEIGHTS, uses="o", eps=1e-6),
    "residual_mask": GateCase((2, 3), 2, 9, residual=True, mask=True, eps=1e-6),
    # D = 1: a large eps keeps the normalized value away from +-1, where its gradient vanishes.
    "D1_mask_no_weights": GateCase((4,), 3, 1, **NO_WEIGHTS, mask=True, uses="o", eps=0.5),
    "plain_sigmoid_scale_default_eps": GateCase((7,), 4, 16, signed_sqrt=False, scale=0.5),
    "float32_weights_residual": GateCase((5,), 2, 33, **FLOAT32_WEIGHTS, residual=True, uses="o", eps=1e-6),
    "transposed": GateCase((3, 2), 2, 12, layouts=laid_out("transposed", "h", "k"), eps=1e-6),
    "many_tokens_mask": GateCase((37,), 2, 64, mask=True, uses="o", eps=1e-6),
}


def shape_ids(shapes: list[tuple]) -> list[str]:
    return [f"lead{lead}-G{G}-D{D}" for lead, G, D in shapes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "G", "D"), SHAPES, ids=shape_ids(SHAPES))
def test_shapes(device: str, dtype: torch.dtype, lead: tuple[int, ...], G: int, D: int, seed: int) -> None:
    check(GateCase(lead, G, D, dtype=dtype, device=device, seed=seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(device: str, dtype: torch.dtype, option: str, seed: int) -> None:
    check(GateCase((6,), 3, 77, dtype=dtype, device=device, seed=seed, **OPTIONS[option]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combination", range(len(COMBINATIONS)))
def test_option_combinations(device: str, dtype: torch.dtype, combination: int, seed: int) -> None:
    check(GateCase((3, 5), 2, 45, dtype=dtype, device=device, seed=seed, **COMBINATIONS[combination]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_small_cases(device: str, dtype: torch.dtype, name: str, seed: int) -> None:
    check(dataclasses.replace(SMALL_CASES[name], dtype=dtype, device=device, seed=seed))


@pytest.mark.parametrize("device", DEVICES)
def test_large_rows_bfloat16(device: str, seed: int) -> None:
    """Engram-sized rows: D = 2560 (Engram-27B's hidden size) with four branches."""
    check(GateCase((64,), 4, 2560, dtype=torch.bfloat16, device=device, mask=True, seed=seed))
