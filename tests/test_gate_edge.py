"""Exact edge cases of the gate: zero scores, masks, NaN containment, determinism, double backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import retrieval_attention
from retrieval_attention import reference

from conftest import DEVICES, DTYPES


def _leaf(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_score_gives_half_gate_and_no_grad_into_h_k(device: str, dtype: torch.dtype) -> None:
    """h orthogonal to k: s = 0 exactly, so a = 0.5 (sign(0) = 0) and dL/dh = dL/dk = 0."""
    N, G, D = 3, 2, 8
    h = torch.zeros(N, G, D, dtype=dtype, device=device)
    k = torch.zeros(N, G, D, dtype=dtype, device=device)
    h[..., : D // 2] = torch.randn(N, G, D // 2, dtype=dtype, device=device)
    k[..., D // 2 :] = torch.randn(N, G, D // 2, dtype=dtype, device=device)
    h.requires_grad_(True)
    k.requires_grad_(True)
    v = _leaf(N, D, dtype=dtype, device=device)
    w = torch.full((G, D), 1.5, dtype=dtype, device=device, requires_grad=True)
    o, a = retrieval_attention.gate(h, k, v, w, w.detach().clone().requires_grad_(True))
    assert torch.equal(a, torch.full_like(a, 0.5))
    dh, dk = torch.autograd.grad((o.float() ** 2).sum() + a.sum(), [h, k])
    assert torch.equal(dh, torch.zeros_like(dh))
    assert torch.equal(dk, torch.zeros_like(dk))
    _, ref_a = reference.gate(h, k, v, w, w)
    assert torch.equal(ref_a, a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_masked_rows_are_exact(device: str, residual: bool) -> None:
    """Masked rows: a = 0, o = 0 (or h), and exactly no gradient through their gate."""
    N, G, D = 6, 3, 40
    h, k, v = _leaf(N, G, D, device=device), _leaf(N, G, D, device=device), _leaf(N, D, device=device)
    mask = torch.tensor([True, False, True, False, False, True], device=device)
    o, a = retrieval_attention.gate(h, k, v, mask=mask, residual=residual)
    off = ~mask
    assert torch.equal(a[off], torch.zeros_like(a[off]))
    assert torch.equal(o[off], h[off].detach() if residual else torch.zeros_like(o[off]))
    go = torch.randn_like(o)
    dh, dk, dv = torch.autograd.grad([o, a], [h, k, v], [go, torch.randn_like(a)])
    assert torch.equal(dh[off], go[off] if residual else torch.zeros_like(dh[off]))
    assert torch.equal(dk[off], torch.zeros_like(dk[off]))
    assert torch.equal(dv[off], torch.zeros_like(dv[off]))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_row(device: str) -> None:
    N, G, D = 5, 2, 16
    h, k, v = _leaf(N, G, D, device=device), _leaf(N, G, D, device=device), _leaf(N, D, device=device)
    with torch.no_grad():
        h[2, 1, 3] = float("nan")
    o, a = retrieval_attention.gate(h, k, v)
    rows = torch.ones(N, G, dtype=torch.bool, device=device)
    rows[2, 1] = False
    assert a[~rows].isnan().all()
    assert torch.isfinite(a[rows]).all()
    assert o[2, 1].isnan().all()
    assert torch.isfinite(o[rows]).all()
    dh, dk, dv = torch.autograd.grad(o.sum(), [h, k, v])
    others = torch.arange(N, device=device) != 2
    for grad in (dh, dk, dv):
        assert torch.isfinite(grad[others]).all()
        assert grad[2].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradients_are_bitwise_repeatable(device: str, dtype: torch.dtype) -> None:
    """No atomics: repeated calls, and one or two threads, give identical weight gradients."""
    N, G, D = 333, 3, 100
    h, k = _leaf(N, G, D, dtype=dtype, device=device), _leaf(N, G, D, dtype=dtype, device=device)
    v = _leaf(N, D, dtype=dtype, device=device)
    w_q, w_k = _leaf(G, D, dtype=dtype, device=device), _leaf(G, D, dtype=dtype, device=device)
    go = torch.randn(N, G, D, dtype=dtype, device=device)

    def weight_grads() -> tuple[torch.Tensor, ...]:
        o, _ = retrieval_attention.gate(h, k, v, w_q, w_k)
        return torch.autograd.grad(o, [w_q, w_k, h, v], go)

    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(weight_grads())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for x, y in zip(runs[0], run, strict=True):
            assert torch.equal(x, y)


def test_double_backward_raises() -> None:
    h, k, v = _leaf(4, 2, 8, dtype=torch.float64), _leaf(4, 2, 8, dtype=torch.float64), _leaf(4, 8, dtype=torch.float64)
    o, _ = retrieval_attention.gate(h, k, v)
    (dh,) = torch.autograd.grad(o.sum(), [h])  # first order still works
    o, _ = retrieval_attention.gate(h, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(o.sum(), [h], create_graph=True)
    assert dh.shape == h.shape


def test_inference_mode_and_no_grad() -> None:
    h, k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.randn(5, 16)
    expected = retrieval_attention.gate(h, k, v)
    with torch.inference_mode():
        got = retrieval_attention.gate(h, k, v)
    with torch.no_grad():
        got_no_grad = retrieval_attention.gate(h, k, v)
    for x, y, z in zip(expected, got, got_no_grad, strict=True):
        assert torch.equal(x, y)
        assert torch.equal(x, z)
        assert not z.requires_grad


class _RecordSaveStats(TorchDispatchMode):
    """Records the save_stats argument of each gate call that reaches the kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.retrieval_attention.gate.default:
            self.calls.append(kwargs.get("save_stats", True))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_writes_no_statistics(device: str) -> None:
    """Without grad nothing is saved for a backward: the kernels get save_stats=False and write no stats."""
    N, G, D = 6, 2, 24
    h, k, v = _leaf(N, G, D, device=device), _leaf(N, G, D, device=device), _leaf(N, D, device=device)
    with torch.no_grad():
        o, a, stats = torch.ops.retrieval_attention.gate(h, k, v)
        o_inf, a_inf, none = torch.ops.retrieval_attention.gate(h, k, v, save_stats=False)
    assert stats.shape == (3, N, G) and none.shape == (0,)
    assert torch.equal(o, o_inf) and torch.equal(a, a_inf)

    recorder = _RecordSaveStats()
    with recorder:
        retrieval_attention.gate(h, k, v)  # trains: the statistics are saved
        with torch.no_grad():
            retrieval_attention.gate(h, k, v)
        retrieval_attention.gate(h.detach(), k.detach(), v.detach())
    assert recorder.calls == [True, False, False]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero_weight_grads(device: str) -> None:
    G, D = 3, 10
    h, k, v = _leaf(0, G, D, device=device), _leaf(0, G, D, device=device), _leaf(0, D, device=device)
    w_q, w_k = _leaf(G, D, device=device), _leaf(G, D, device=device)
    o, a = retrieval_attention.gate(h, k, v, w_q, w_k)
    assert o.shape == (0, G, D) and a.shape == (0, G)
    grads = torch.autograd.grad(o.sum() + a.sum(), [h, k, v, w_q, w_k])
    assert torch.equal(grads[3], torch.zeros(G, D, device=device))
    assert torch.equal(grads[4], torch.zeros(G, D, device=device))
    assert [g.shape for g in grads[:3]] == [h.shape, k.shape, v.shape]


def test_default_eps_follows_the_input_dtype() -> None:
    """eps=None is torch.finfo(h.dtype).eps, as nn.RMSNorm(eps=None): large for bfloat16, visible on tiny rows."""
    h = torch.full((1, 1, 4), 0.05, dtype=torch.bfloat16)
    k = torch.full((1, 1, 4), 0.05, dtype=torch.bfloat16)
    v = torch.ones(1, 4, dtype=torch.bfloat16)
    _, a_default = retrieval_attention.gate(h, k, v)
    _, a_explicit = retrieval_attention.gate(h, k, v, eps=torch.finfo(torch.bfloat16).eps)
    _, a_tiny = retrieval_attention.gate(h, k, v, eps=1e-12)
    assert torch.equal(a_default, a_explicit)
    assert not torch.equal(a_default, a_tiny)
