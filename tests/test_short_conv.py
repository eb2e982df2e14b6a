"""The fused short convolution (docs/block.md) against reference.short_conv, inside PyTorch's machinery,
on every device in conftest.DEVICES (the CUDA cases skip, visibly, without a GPU)."""

from __future__ import annotations

import pytest
import torch

import retrieval_attention as ra
from retrieval_attention import reference

import bad_input
from bad_input import BadCase
from conftest import DEVICES, DTYPES, NEEDS_CUDA
from gate_harness import compute_dtype
from tolerances import assert_agree, assert_close_to_truth

# (B, T, G, D, K, dilation): Engram's K = 4 and dilation 3; T shorter than the context; K = 1; odd D.
SHAPES = [(2, 13, 3, 20, 4, 3), (1, 5, 2, 7, 4, 3), (3, 2, 1, 9, 3, 2), (1, 9, 4, 33, 1, 1), (2, 17, 1, 16, 5, 1)]


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, param_dtype: torch.dtype | None = None, device: str = "cpu"
):
    B, T, G, D, K, _ = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, G, D, generator=gen, dtype=torch.float64)
    weight = 0.5 * torch.randn(G * D, 1, K, generator=gen, dtype=torch.float64)
    norm_weight = 1 + 0.3 * torch.randn(G, D, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(B, T, G, D, generator=gen, dtype=torch.float64)
    pd = param_dtype or dtype
    return tuple(
        t.to(device=device, dtype=d) for t, d in ((x, dtype), (weight, pd), (norm_weight, pd), (grad_y, dtype))
    )


def _run(fn, x, weight, norm_weight, grad_y, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, norm_weight)]
    y = fn(*leaves, **kwargs)
    return (y, *torch.autograd.grad(y, leaves, grad_y))


def _reference(x, weight, norm_weight, *, dilation: int, residual: bool, eps: float = 1e-5):
    out = reference.short_conv(x, weight.to(x.dtype), norm_weight.to(x.dtype), dilation=dilation, eps=eps)
    return x + out if residual else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [True, False])
def test_matches_the_reference(
    device: str, dtype: torch.dtype, shape: tuple[int, ...], residual: bool, seed: int
) -> None:
    """Output and the three gradients, against the float64 truth, no worse than the reference in the same precision."""
    x, w, nw, gy = _inputs(shape, dtype, seed, device=device)
    dilation = shape[-1]
    ours = _run(ra.short_conv, x, w, nw, gy, dilation=dilation, residual=residual)
    same = _run(_reference, *(t.to(compute_dtype(dtype)) for t in (x, w, nw, gy)), dilation=dilation, residual=residual)
    truth = _run(_reference, *(t.double() for t in (x, w, nw, gy)), dilation=dilation, residual=residual)
    for name, o, s, t in zip(("y", "grad_x", "grad_weight", "grad_norm_weight"), ours, same, truth, strict=True):
        assert o.dtype == (x.dtype if name in ("y", "grad_x") else w.dtype), name
        assert_close_to_truth(o, t, s, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_parameters_with_bfloat16_input(device: str, seed: int) -> None:
    x, w, nw, gy = _inputs(SHAPES[0], torch.bfloat16, seed, param_dtype=torch.float32, device=device)
    y, gx, gw, gnw = _run(ra.short_conv, x, w, nw, gy, dilation=3)
    truth = _run(_reference, *(t.double() for t in (x, w, nw, gy)), dilation=3, residual=True)
    assert (y.dtype, gx.dtype, gw.dtype, gnw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    for name, o, t in zip(("y", "grad_x", "grad_weight", "grad_norm_weight"), (y, gx, gw, gnw), truth, strict=True):
        assert_agree(o, t, name, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_gives_the_contiguous_result(device: str, seed: int) -> None:
    x, w, nw, gy = _inputs(SHAPES[0], torch.float64, seed, device=device)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, G, D] with G outermost in memory
    assert not strided.is_contiguous()
    a = _run(ra.short_conv, x, w, nw, gy, dilation=3)
    b = _run(ra.short_conv, strided, w, nw, gy, dilation=3)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device: str) -> None:
    x, w, nw, _ = _inputs((2, 7, 2, 5, 3, 2), torch.float64, 3, device=device)
    for residual in (True, False):
        args = tuple(t.requires_grad_() for t in (x.clone(), w.clone(), nw.clone()))
        assert torch.autograd.gradcheck(lambda *a, r=residual: ra.short_conv(*a, dilation=2, residual=r), args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x, w, nw, gy = _inputs(SHAPES[0], torch.float32, 5, device=device)
    kwargs = {"dilation": 3, "eps": 1e-5, "residual": True}
    torch.library.opcheck(torch.ops.retrieval_attention.short_conv.default, (x.requires_grad_(), w, nw), kwargs)
    torch.library.opcheck(torch.ops.retrieval_attention.short_conv_backward.default, (gy, x.detach(), w, nw), kwargs)


def test_compile_fullgraph_without_recompiles(seed: int) -> None:
    module = ra.ShortConv(20, 3, zero_init=False).double()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (13, 7, 21):
            x = torch.randn(2, T, 3, 20, dtype=torch.float64, requires_grad=True)
            y = compiled(x, residual=True)
            y.square().sum().backward()
            assert_agree(y, _reference(x, module.weight, module.norm_weight, dilation=3, residual=True), "y")


def test_same_bits_for_any_thread_count(seed: int) -> None:
    x, w, nw, gy = _inputs((4, 19, 3, 24, 4, 3), torch.float32, seed)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_run(ra.short_conv, x, w, nw, gy, dilation=3))
    finally:
        torch.set_num_threads(threads)
    for u, v in zip(*runs, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequences_give_zero_parameter_gradients(device: str) -> None:
    x, w, nw, gy = _inputs((2, 0, 3, 4, 4, 3), torch.float32, 0, device=device)
    y, gx, gw, gnw = _run(ra.short_conv, x, w, nw, gy, dilation=3)
    assert y.shape == x.shape and gx.shape == x.shape
    assert not gw.any() and not gnw.any()


@pytest.mark.parametrize("device", DEVICES)
def test_same_bits_every_run(device: str, seed: int) -> None:
    """The weight gradients are summed in a fixed order (no atomics): two runs agree bit for bit."""
    x, w, nw, gy = _inputs((4, 75, 3, 24, 4, 3), torch.float32, seed, device=device)
    for u, v in zip(_run(ra.short_conv, x, w, nw, gy), _run(ra.short_conv, x, w, nw, gy), strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 70, 2, 130, 4, 3), (1, 100, 1, 16, 3, 40)], ids=["tiles", "wide-dilation"])
def test_longer_sequences(device: str, shape: tuple[int, ...], seed: int) -> None:
    """Sequences over several of the CUDA kernels' tiles, taps further apart than a tile, D over a block's threads."""
    x, w, nw, gy = _inputs(shape, torch.float64, seed, device=device)
    ours = _run(ra.short_conv, x, w, nw, gy, dilation=shape[-1])
    truth = _run(_reference, x, w, nw, gy, dilation=shape[-1], residual=True)
    for name, o, t in zip(("y", "grad_x", "grad_weight", "grad_norm_weight"), ours, truth, strict=True):
        assert_agree(o, t, name)


def test_cuda_runs_the_kernel_in_a_cuda_build() -> None:
    """CUDA inputs take the operator (not the PyTorch fallback) exactly when the CUDA kernels are built."""
    from retrieval_attention import functional

    assert ("cuda" in functional._SHORT_CONV_DEVICES) == ra.build_info()["cuda"]
    assert {"cpu", "meta"} <= functional._SHORT_CONV_DEVICES


@NEEDS_CUDA
def test_cuda_too_many_taps_names_the_weight() -> None:
    """More taps than the backward's shared memory holds: an error naming `weight`, not a failed launch."""
    x = torch.zeros(1, 4, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="`weight`"):
        ra.short_conv(x, torch.zeros(8, 1, 4096, device="cuda"), torch.ones(1, 8, device="cuda"), dilation=64)


def _conv_call(x: tuple, weight: tuple, norm_weight: tuple, **kwargs):
    def build():
        return ra.short_conv, (torch.zeros(*x), torch.zeros(*weight), torch.ones(*norm_weight)), kwargs

    return build


BAD_INPUTS = {
    "x-rank": ((2, 3, 4), (4, 1, 4), (1, 4), "`x`", ValueError),
    "weight-channels": ((1, 3, 2, 4), (4, 1, 4), (2, 4), "`weight`", ValueError),
    "weight-rank": ((1, 3, 2, 4), (8, 4), (2, 4), "`weight`", ValueError),
    "kernel-size-0": ((1, 3, 2, 4), (8, 1, 0), (2, 4), "`weight`", ValueError),
    "norm-g": ((1, 3, 2, 4), (8, 1, 4), (3, 4), "`norm_weight`", ValueError),
    "norm-d": ((1, 3, 2, 4), (8, 1, 4), (2, 5), "`norm_weight`", ValueError),
}
GOOD = ((1, 3, 2, 4), (8, 1, 4), (2, 4))  # x, weight, norm_weight shapes that are right
CASES: dict[str, BadCase] = {
    **bad_input.named(BAD_INPUTS, _conv_call, "short_conv"),
    **bad_input.named({"dilation-0": (*GOOD, "`dilation`", ValueError)}, _conv_call, "short_conv", dilation=0),
    **bad_input.named({"eps-negative": (*GOOD, "`eps`", ValueError)}, _conv_call, "short_conv", eps=-1.0),
    "short_conv-x-dtype": BadCase(
        lambda: (
            ra.short_conv,
            (torch.zeros(1, 3, 2, 4, dtype=torch.int64), torch.zeros(8, 1, 4), torch.ones(2, 4)),
            {},
        ),
        TypeError,
        "`x`",
    ),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
