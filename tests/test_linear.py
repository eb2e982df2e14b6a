"""The projection operator (docs/block.md) against F.linear, inside PyTorch's machinery, on every device in
conftest.DEVICES (the CUDA cases skip, visibly, without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_attention as ra
from retrieval_attention import _linear

import bad_input
from bad_input import BadCase
from conftest import DEVICES, DTYPES
from tolerances import assert_agree, assert_close_to_truth

linear_op = torch.ops.retrieval_attention.linear

# (leading dims, in, out): the block's shape, odd sizes, one row, no rows.
SHAPES = [((2, 7), 48, 80), ((3,), 33, 17), ((1, 1, 1), 5, 9), ((0, 4), 16, 8), ((64,), 1024, 256)]


def _inputs(lead: tuple[int, ...], n_in: int, n_out: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, w, b, gy = (
        torch.randn(shape, generator=gen, dtype=torch.float64)
        for shape in ((*lead, n_in), (n_out, n_in), (n_out,), (*lead, n_out))
    )
    return [t.to(device=device, dtype=dtype) for t in (x, w / n_in**0.5, b, gy)]


def _run(fn, x, w, b, gy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, gy))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_linear(shape, dtype: torch.dtype, device: str, seed: int) -> None:
    x, w, b, gy = _inputs(*shape, dtype, device, seed)
    ours = _run(linear_op, x, w, b, gy)
    truth = _run(F.linear, *(t.double() for t in (x, w, b, gy)))
    same = _run(F.linear, *(t.float() if dtype in (torch.float16, torch.bfloat16) else t for t in (x, w, b, gy)))
    for name, o, t, s in zip(("y", "grad_x", "grad_weight", "grad_bias"), ours, truth, same, strict=True):
        assert o.dtype == dtype
        assert_close_to_truth(o, t, s, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_and_no_bias(device: str, seed: int) -> None:
    x, w, _, gy = _inputs((6, 5), 40, 24, torch.float32, device, seed)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # [6, 5, 40] with swapped strides
    assert not x_t.is_contiguous()
    ours = [t.detach().clone().requires_grad_() for t in (x_t, w)]
    eager = [t.detach().clone().requires_grad_() for t in (x, w)]
    y_ours, y_eager = linear_op(*ours), F.linear(*eager)
    assert_agree(y_ours, y_eager)
    for a, e in zip(torch.autograd.grad(y_ours, ours, gy), torch.autograd.grad(y_eager, eager, gy), strict=True):
        assert_agree(a, e)


def test_frozen_inputs_get_no_gradient(seed: int) -> None:
    x, w, b, gy = _inputs((4, 3), 16, 8, torch.float32, "cpu", seed)
    w.requires_grad_()
    y = linear_op(x, w, b)
    (grad_w,) = torch.autograd.grad(y, [w], gy)
    assert_agree(grad_w, gy.flatten(0, 1).t() @ x.flatten(0, 1))
    masked = torch.ops.retrieval_attention.linear_backward(gy, x, w.detach(), [False, True, False])
    assert masked[0].shape == (0,) and masked[2].shape == (0,)
    assert_agree(masked[1], grad_w)


def test_gradcheck_float64() -> None:
    x, w, b, _ = _inputs((3, 2), 6, 5, torch.float64, "cpu", 0)
    assert torch.autograd.gradcheck(linear_op, [t.requires_grad_() for t in (x, w, b)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype: torch.dtype) -> None:
    x, w, b, gy = _inputs((3, 4), 24, 12, dtype, "cpu", 1)
    torch.library.opcheck(linear_op, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    torch.library.opcheck(torch.ops.retrieval_attention.linear_backward, (gy, x.detach(), w.detach(), [True] * 3))


def test_block_uses_the_operator_where_it_pays() -> None:
    """float32 on the CPU: the operator; under autocast and in other dtypes: F.linear, as nn.Linear."""
    block = ra.RetrievalAttention(16, 12, 2)
    hidden, retrieved = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 12)

    def ops_run(fn) -> set[str]:
        with torch.profiler.profile() as prof:
            fn()
        return {e.key for e in prof.key_averages()}

    assert "retrieval_attention::linear" in ops_run(lambda: block(hidden, retrieved))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        names = ops_run(lambda: block(hidden, retrieved))
        assert "retrieval_attention::linear" not in names and "aten::linear" in names
    block_f64 = ra.RetrievalAttention(16, 12, 2, dtype=torch.float64)
    assert "retrieval_attention::linear" not in ops_run(lambda: block_f64(hidden.double(), retrieved.double()))
    _linear.use_operator = False
    try:
        assert "retrieval_attention::linear" not in ops_run(lambda: block(hidden, retrieved))
    finally:
        _linear.use_operator = True


def test_compiles_without_graph_break_or_recompile() -> None:
    torch._dynamo.reset()  # the class's forward compiled by other tests would count as a recompile
    layer = _linear.Linear(24, 40)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = torch.randn(5, 24, generator=torch.Generator().manual_seed(seed), requires_grad=True)
            y_c, y_e = compiled(x), layer(x)
            assert_agree(y_c, y_e)
            assert_agree(torch.autograd.grad(y_c.sum(), x)[0], torch.autograd.grad(y_e.sum(), x)[0])


def _linear_call(x_shape, w_shape, b_shape, dtype=torch.float32, w_dtype=None):
    def build():
        bias = None if b_shape is None else torch.zeros(b_shape, dtype=w_dtype or dtype)
        return linear_op, (torch.zeros(x_shape, dtype=dtype), torch.zeros(w_shape, dtype=w_dtype or dtype), bias), {}

    return build


CASES: dict[str, BadCase] = {
    "linear-weight-1d": BadCase(_linear_call((2, 4), (4,), None), ValueError, "`weight`"),
    "linear-x-in": BadCase(_linear_call((2, 5), (3, 4), None), ValueError, "`x`"),
    "linear-bias-size": BadCase(_linear_call((2, 4), (3, 4), (4,)), ValueError, "`bias`"),
    "linear-x-integer": BadCase(_linear_call((2, 4), (3, 4), None, dtype=torch.int64), TypeError, "`x`"),
    "linear-weight-dtype": BadCase(_linear_call((2, 4), (3, 4), None, w_dtype=torch.float64), TypeError, "`weight`"),
    "linear_backward-grad-shape": BadCase(
        lambda: (
            torch.ops.retrieval_attention.linear_backward,
            (torch.zeros(2, 5), torch.zeros(2, 4), torch.zeros(3, 4), [True, True, True]),
            {},
        ),
        ValueError,
        "`grad_y`",
    ),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
