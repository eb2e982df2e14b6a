"""The gate against the float64 reference: every dtype, shape, option and layout, forward and all gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DEVICES, DTYPES
from gate_cases import Case, check_against_reference, shape_ids

SHAPES = [
    ((0,), 2, 8),  # N = 0
    ((5,), 1, 1),  # D = 1
    ((7,), 3, 129),  # odd D
    ((4,), 5, 1000),  # G = 5, D not a multiple of any vector width
    ((2, 3), 2, 33),  # extra leading dims
    ((3, 1, 4), 4, 64),  # three leading dims, one of them 1
    ((40,), 4, 256),  # several weight-gradient chunks
]

OPTIONS = {
    "no_weights": {"weights": "none"},
    "only_w_q": {"weights": "q"},
    "only_w_k": {"weights": "k"},
    "float32_weights": {"weights": "float32"},
    "plain_sigmoid": {"signed_sqrt": False},
    "scale_eps": {"scale": 0.37, "eps": 1e-3},
    "residual": {"residual": True},
    "mask": {"mask": True},
    "residual_mask": {"residual": True, "mask": True},
    "strided": {"layout": "strided"},
    "inner_strided": {"layout": "inner_strided"},
    "fused_kv": {"layout": "fused_kv"},
    "only_o_used": {"grad_a": False},
    "only_a_used": {"grad_o": False},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "G", "D"), SHAPES, ids=shape_ids(SHAPES))
def test_shapes(device: str, dtype: torch.dtype, lead: tuple[int, ...], G: int, D: int) -> None:
    check_against_reference(Case(lead, G, D, dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(device: str, dtype: torch.dtype, option: str) -> None:
    check_against_reference(dataclasses.replace(Case((6,), 3, 77, dtype=dtype, device=device), **OPTIONS[option]))


# Options together, where one path could undo another (a fused projection with a mask and a
# residual, one weight in float32, strided rows without weights, ...).
COMBINATIONS = [
    {"layout": "fused_kv", "residual": True, "mask": True, "weights": "none"},
    {"layout": "fused_kv", "weights": "float32", "signed_sqrt": False},
    {"layout": "strided", "residual": True, "weights": "q", "grad_a": False},
    {"layout": "strided", "mask": True, "scale": 2.0, "eps": 0.0},
    {"layout": "inner_strided", "weights": "k", "residual": True, "grad_o": False},
    {"layout": "inner_strided", "mask": True, "weights": "float32", "eps": 0.5},
    {"weights": "none", "signed_sqrt": False, "residual": True, "mask": True},
    {"weights": "float32", "residual": True, "mask": True, "scale": 0.05},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combination", range(len(COMBINATIONS)))
def test_option_combinations(device: str, dtype: torch.dtype, combination: int) -> None:
    check_against_reference(Case((3, 5), 2, 45, dtype=dtype, device=device, **COMBINATIONS[combination]))


@pytest.mark.parametrize("device", DEVICES)
def test_large_rows_bfloat16(device: str) -> None:
    """Engram-sized rows: D = 2560 (Engram-27B's hidden size) with four branches."""
    check_against_reference(Case((64,), 4, 2560, dtype=torch.bfloat16, device=device, mask=True))
