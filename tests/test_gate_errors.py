"""Every bad input of SPEC §2 raises an error that names the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

import retrieval_attention

from conftest import HAS_CUDA

N, G, D = 4, 2, 8


def _good() -> dict:
    return {
        "h": torch.randn(N, G, D),
        "k": torch.randn(N, G, D),
        "v": torch.randn(N, D),
        "w_q": torch.ones(G, D),
        "w_k": torch.ones(G, D),
    }


BAD_INPUTS = {
    "h_rank": ({"h": torch.randn(D), "k": torch.randn(D), "v": torch.randn(D)}, {}, "`h`", ValueError),
    "h_integer": ({"h": torch.ones(N, G, D, dtype=torch.int64)}, {}, "`h`", TypeError),
    "h_complex": ({"h": torch.randn(N, G, D, dtype=torch.complex64)}, {}, "`h`", TypeError),
    "h_no_D": ({"h": torch.randn(N, G, 0), "k": torch.randn(N, G, 0), "v": torch.randn(N, 0)}, {}, "`h`", ValueError),
    "k_shape": ({"k": torch.randn(N, G, D + 1)}, {}, "`k`", ValueError),
    "k_dtype": ({"k": torch.randn(N, G, D, dtype=torch.float64)}, {}, "`k`", TypeError),
    "v_shape": ({"v": torch.randn(N, D + 1)}, {}, "`v`", ValueError),
    "v_leading": ({"v": torch.randn(N + 1, D)}, {}, "`v`", ValueError),
    "v_dtype": ({"v": torch.randn(N, D, dtype=torch.bfloat16)}, {}, "`v`", TypeError),
    "w_q_shape": ({"w_q": torch.ones(G + 1, D)}, {}, "`w_q`", ValueError),
    "w_k_shape": ({"w_k": torch.ones(D)}, {}, "`w_k`", ValueError),
    "w_q_dtype": ({"w_q": torch.ones(G, D, dtype=torch.float16)}, {}, "`w_q`", TypeError),
    "mask_dtype": ({}, {"mask": torch.ones(N, dtype=torch.int32)}, "`mask`", TypeError),
    "mask_shape": ({}, {"mask": torch.ones(N, G, dtype=torch.bool)}, "`mask`", ValueError),
    "eps_negative": ({}, {"eps": -1e-6}, "`eps`", ValueError),
    "eps_nan": ({}, {"eps": float("nan")}, "`eps`", ValueError),
    "scale_inf": ({}, {"scale": float("inf")}, "`scale`", ValueError),
    "clamp_zero": ({}, {"sqrt_clamp": 0.0}, "`sqrt_clamp`", ValueError),
    "clamp_negative": ({}, {"sqrt_clamp": -1.0}, "`sqrt_clamp`", ValueError),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case: str) -> None:
    tensors, kwargs, name, error = BAD_INPUTS[case]
    args = {**_good(), **tensors}
    with pytest.raises(error, match=name) as info:
        retrieval_attention.gate(args["h"], args["k"], args["v"], args["w_q"], args["w_k"], **kwargs)
    message = str(info.value)
    assert "expected" in message and "got" in message, message


def test_clamp_is_free_without_signed_sqrt() -> None:
    args = _good()
    o, _ = retrieval_attention.gate(*args.values(), signed_sqrt=False, sqrt_clamp=0.0)
    assert torch.isfinite(o).all()


def test_backward_checks_its_saved_inputs() -> None:
    args = _good()
    o, a, stats = torch.ops.retrieval_attention.gate(*args.values())
    with pytest.raises(ValueError, match="`stats`"):
        torch.ops.retrieval_attention.gate_backward(
            torch.ones_like(o),
            None,
            *args.values(),
            None,
            a,
            stats[:2],
            scale=None,
            signed_sqrt=True,
            sqrt_clamp=1e-6,
            residual=False,
        )


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_mixed_devices_name_the_argument() -> None:
    args = _good()
    with pytest.raises(RuntimeError, match="`k`"):
        retrieval_attention.gate(args["h"].cuda(), args["k"], args["v"].cuda())
