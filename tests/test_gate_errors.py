"""Bad input to the gate (docs/gate.md): an error that names the argument, what was expected and what was given.

Each bad input runs once, in a child process (tests/bad_input.py): through the functional API, the
registered operator, the module and the backward operator.
"""

from __future__ import annotations

import torch

import retrieval_attention
from retrieval_attention import RetrievalGate

import bad_input
from bad_input import BadCase

N, G, D = 4, 2, 8


def _good() -> dict[str, torch.Tensor]:
    return {
        "h": torch.randn(N, G, D),
        "k": torch.randn(N, G, D),
        "v": torch.randn(N, D),
        "w_q": torch.ones(G, D),
        "w_k": torch.ones(G, D),
    }


def _gate_call(tensors: dict, kwargs: dict, via: str = "functional"):
    def build() -> tuple:
        args = {name: t.clone() for name, t in {**_good(), **tensors}.items()}  # fresh: version counters at 0
        positional = tuple(args[name] for name in ("h", "k", "v", "w_q", "w_k"))
        fn = torch.ops.retrieval_attention.gate if via == "op" else retrieval_attention.gate
        return fn, positional, dict(kwargs)

    return build


# (tensors replacing the good ones, keyword arguments, the argument the error names, the error)
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

# More, through the functional API only.
MORE_BAD_INPUTS = {
    "k_rank": ({"k": torch.randn(N * G, D)}, {}, "`k`", ValueError),
    "v_rank": ({"v": torch.randn(N, G, D)}, {}, "`v`", ValueError),
    "h_no_G": ({"h": torch.randn(N, 0, D), "k": torch.randn(N, 0, D)}, {}, "`h`", ValueError),
    "h_bool": ({"h": torch.ones(N, G, D, dtype=torch.bool)}, {}, "`h`", TypeError),
    "k_integer": ({"k": torch.ones(N, G, D, dtype=torch.int32)}, {}, "`k`", TypeError),
    "v_integer": ({"v": torch.ones(N, D, dtype=torch.int16)}, {}, "`v`", TypeError),
    "v_complex": ({"v": torch.randn(N, D, dtype=torch.complex64)}, {}, "`v`", TypeError),
    "w_k_integer": ({"w_k": torch.ones(G, D, dtype=torch.int64)}, {}, "`w_k`", TypeError),
    "w_q_complex": ({"w_q": torch.ones(G, D, dtype=torch.complex64)}, {}, "`w_q`", TypeError),
    "w_k_float64": ({"w_k": torch.ones(G, D, dtype=torch.float64)}, {}, "`w_k`", TypeError),
    "w_q_transposed": ({"w_q": torch.ones(D, G)}, {}, "`w_q`", ValueError),
    "mask_leading": ({}, {"mask": torch.ones(N + 1, dtype=torch.bool)}, "`mask`", ValueError),
    "mask_float": ({}, {"mask": torch.ones(N)}, "`mask`", TypeError),
    "eps_inf": ({}, {"eps": float("inf")}, "`eps`", ValueError),
    "scale_nan": ({}, {"scale": float("nan")}, "`scale`", ValueError),
    "clamp_nan": ({}, {"sqrt_clamp": float("nan")}, "`sqrt_clamp`", ValueError),
    "clamp_inf": ({}, {"sqrt_clamp": float("inf")}, "`sqrt_clamp`", ValueError),
    "leading_dims_differ": (
        {"h": torch.randn(2, 3, G, D), "k": torch.randn(3, 2, G, D), "v": torch.randn(2, 3, D)},
        {},
        "`k`",
        ValueError,
    ),
}


def _module_bad_k() -> tuple:
    return RetrievalGate(D, G), (torch.randn(N, G, D), torch.randn(N, G, D + 1), torch.randn(N, D)), {}


def _save_stats_off_with_grad() -> tuple:
    """save_stats=False while autograd records: the backward would have no statistics."""
    args = {name: t.requires_grad_(True) for name, t in _good().items()}
    return torch.ops.retrieval_attention.gate, tuple(args.values()), {"save_stats": False}


def _backward_case(change: str):
    """gate_backward given a bad saved tensor or gradient; every argument by keyword."""

    def build() -> tuple:
        good = _good()
        o, a, stats = torch.ops.retrieval_attention.gate(*good.values())
        grad_o, grad_a = torch.ones_like(o), None
        if change == "stats_shape":
            stats = stats[:2].clone()
        elif change == "a_dtype":
            a = a.double()
        elif change == "grad_o_shape":
            grad_o = torch.ones(N, G, D + 1)
        elif change == "grad_a_shape":
            grad_a = torch.ones(N)
        kwargs = {"grad_o": grad_o, "grad_a": grad_a, "a": a, "stats": stats, **good, "mask": None}
        kwargs |= {"scale": None, "signed_sqrt": True, "sqrt_clamp": 1e-6, "residual": False}
        return torch.ops.retrieval_attention.gate_backward, (), kwargs

    return build


def _mixed_devices(on_cpu: str):
    def build() -> tuple:
        args = {name: t if name == on_cpu else t.cuda() for name, t in _good().items()}
        return retrieval_attention.gate, tuple(args.values()), {}

    return build


CASES: dict[str, BadCase] = {
    **bad_input.named(BAD_INPUTS, _gate_call, "gate"),
    **bad_input.named(BAD_INPUTS, _gate_call, "gate_op", via="op"),
    **bad_input.named(MORE_BAD_INPUTS, _gate_call, "gate"),
    "gate_module-k_shape": BadCase(_module_bad_k, ValueError, "`k`"),
    "gate_op-save_stats_off_with_grad": BadCase(
        _save_stats_off_with_grad, ValueError, "`save_stats`", expected_got=False
    ),
    "gate_backward-stats_shape": BadCase(_backward_case("stats_shape"), ValueError, "`stats`"),
    "gate_backward-a_dtype": BadCase(_backward_case("a_dtype"), TypeError, "`a`"),
    "gate_backward-grad_o_shape": BadCase(_backward_case("grad_o_shape"), ValueError, "`grad_o`"),
    "gate_backward-grad_a_shape": BadCase(_backward_case("grad_a_shape"), ValueError, "`grad_a`"),
    **{
        f"cuda_devices-{name}": BadCase(_mixed_devices(name), RuntimeError, f"`{name}`", cuda=True)
        for name in ("k", "v", "w_q")
    },
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)


def test_clamp_is_free_without_signed_sqrt() -> None:
    """sqrt_clamp = 0 is bad only where the signed square root uses it."""
    o, _ = retrieval_attention.gate(*_good().values(), signed_sqrt=False, sqrt_clamp=0.0)
    assert torch.isfinite(o).all()
