"""The fused single-token decode step (``decode_step``, docs/block.md "Decoding a token at a time"): the
gate, the short convolution over the state and the state's update in one kernel. It equals the existing
path (gate, then ``ShortConv`` with a state) and one forward over the whole sequence; its state is the
existing path's, so the two paths can take turns; CUDA graphs capture it."""

from __future__ import annotations

import pytest
import torch

import retrieval_attention as ra
from retrieval_attention import RetrievalAttention, modules

import bad_input
from bad_input import BadCase
from conftest import DEVICES, NEEDS_CUDA
from tolerances import assert_agree

DECODE_ATOL = 1e-11  # float64: the same rows and sums, up to the order of a few additions
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
D_E = 12


def _block(
    G: int, D: int, K: int, dilation: int, device: str, dtype: torch.dtype = torch.float64
) -> RetrievalAttention:
    block = RetrievalAttention(D, D_E, G, conv_kernel_size=K, conv_dilation=dilation, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(G * 1000 + D * 10 + K)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device, dtype))
    return block


def _inputs(B: int, T: int, G: int, D: int, device: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, G, D, generator=gen, dtype=torch.float64).to(device, dtype)
    retrieved = torch.randn(B, T, D_E, generator=gen, dtype=torch.float64).to(device, dtype)
    return hidden, retrieved


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the block's calls of the decode step operator: a test asserts which path ran."""
    calls: list[int] = []
    real = modules.decode_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modules, "decode_step", counting)
    return calls


SHAPES = [(1, 8, 4, 3), (3, 33, 4, 3), (2, 16, 3, 1), (2, 5, 1, 2), (3, 7, 3, 5)]  # G, D, K, dilation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("G", "D", "K", "dilation"), SHAPES)
@pytest.mark.parametrize("prefill", [0, 2, 11])
def test_prefill_then_fused_decode_equals_one_forward(
    device: str, G: int, D: int, K: int, dilation: int, prefill: int, fused_calls: list[int]
) -> None:
    """A prefill (none, shorter than the context, longer) by the existing path, then a token per call fused."""
    block = _block(G, D, K, dilation, device)
    B, T = 2, 16
    hidden, retrieved = _inputs(B, T, G, D, device, torch.float64, G * 100 + D + prefill)
    with torch.no_grad():
        want, want_gate = block(hidden, retrieved, return_gate=True)
        state = block.new_conv_state(B)
        parts = [block(hidden[:, :prefill], retrieved[:, :prefill], conv_state=state)] if prefill else []
        gates = []
        for t in range(prefill, T):
            y, a = block(hidden[:, t : t + 1], retrieved[:, t : t + 1], conv_state=state, return_gate=True)
            parts.append(y)
            gates.append(a)
    assert len(fused_calls) == T - prefill
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=0, atol=DECODE_ATOL)
    torch.testing.assert_close(torch.cat(gates, dim=1), want_gate[:, prefill:], rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_paths_take_turns_on_one_state(device: str, fused_calls: list[int]) -> None:
    """Fused tokens, then a chunk by the existing path, then fused again: one forward's outputs."""
    block = _block(2, 16, 4, 3, device)
    hidden, retrieved = _inputs(1, 20, 2, 16, device, torch.float64, 7)
    chunks = [1, 1, 1, 5, 1, 1, 4, 1, 1, 1, 1, 1, 1]
    assert sum(chunks) == 20
    with torch.no_grad():
        want = block(hidden, retrieved)
        state = block.new_conv_state(1)
        parts, t = [], 0
        for n in chunks:
            parts.append(block(hidden[:, t : t + n], retrieved[:, t : t + n], conv_state=state))
            t += n
    assert len(fused_calls) == chunks.count(1)
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("G", "D", "K", "dilation"), SHAPES[:3])
def test_fused_step_equals_the_existing_path(
    device: str, dtype: torch.dtype, G: int, D: int, K: int, dilation: int, fused_calls: list[int]
) -> None:
    """One token after a prefill: y, a and the updated state, fused against the gate then ShortConv."""
    block = _block(G, D, K, dilation, device, dtype)
    B = 3
    hidden, retrieved = _inputs(B, 10, G, D, device, dtype, G + D + K)
    with torch.no_grad():
        state = block.new_conv_state(B)
        block(hidden[:, :9], retrieved[:, :9], conv_state=state)
        existing_state, fused_state = state.clone(), state.clone()
        # The existing path: the gate operator, then ShortConv's cat and short_conv.
        v, k = modules._SplitKV.apply(block.kv_proj(retrieved[:, 9:]), G, D)
        o, want_a = block.gate(hidden[:, 9:], k, v)
        want = block.short_conv(o, residual=True, state=existing_state)
        y, a = block(hidden[:, 9:], retrieved[:, 9:], conv_state=fused_state, return_gate=True)
    assert len(fused_calls) == 1
    assert y.dtype == dtype and a.dtype == want_a.dtype and y.shape == want.shape and a.shape == want_a.shape
    assert_agree(y, want, "y", dtype)
    assert_agree(a, want_a, "a", dtype)
    assert_agree(fused_state, existing_state, "conv_state", dtype)
    if dtype == torch.float64:
        torch.testing.assert_close(y, want, rtol=0, atol=DECODE_ATOL)
        torch.testing.assert_close(fused_state, existing_state, rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_module_takes_the_existing_path_otherwise(device: str, fused_calls: list[int]) -> None:
    """With a gradient to compute, a mask, several tokens or no state, the block runs the gate and ShortConv."""
    block = _block(2, 16, 4, 3, device)
    hidden, retrieved = _inputs(2, 1, 2, 16, device, torch.float64, 3)
    y = block(hidden, retrieved, conv_state=block.new_conv_state(2))  # grad mode on, parameters require grad
    y.sum().backward()
    assert block.short_conv.weight.grad is not None
    with torch.no_grad():
        block(hidden, retrieved, torch.ones(2, 1, dtype=torch.bool, device=device), conv_state=block.new_conv_state(2))
        block(hidden, retrieved)
        fused = block(hidden, retrieved, conv_state=block.new_conv_state(2))
    assert len(fused_calls) == 1
    torch.testing.assert_close(fused, y.detach(), rtol=0, atol=DECODE_ATOL)
    block.requires_grad_(False)
    block(hidden, retrieved, conv_state=block.new_conv_state(2))  # grad mode on, but nothing requires grad
    assert len(fused_calls) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_the_single_stream_form(device: str, fused_calls: list[int]) -> None:
    block = _block(1, 9, 4, 3, device)
    with torch.no_grad():
        y = block(*_inputs(0, 1, 1, 9, device, torch.float64, 1), conv_state=block.new_conv_state(0))
        assert y.shape == (0, 1, 1, 9)
        hidden, retrieved = _inputs(2, 1, 1, 9, device, torch.float64, 2)
        state = block.new_conv_state(2)
        flat = block(hidden.squeeze(2), retrieved, conv_state=state.clone())  # [B, T, D] when G = 1
        full = block(hidden, retrieved, conv_state=state)
    assert len(fused_calls) == 3
    assert flat.shape == (2, 1, 9)
    torch.testing.assert_close(flat, full.squeeze(2), rtol=0, atol=0)


def test_meta_device_takes_the_existing_path(fused_calls: list[int]) -> None:
    block = RetrievalAttention(8, 6, 2, device="meta")
    with torch.no_grad():
        y = block(
            torch.empty(3, 1, 2, 8, device="meta"),
            torch.empty(3, 1, 6, device="meta"),
            conv_state=block.new_conv_state(3),
        )
    assert y.shape == (3, 1, 2, 8) and y.device.type == "meta"
    assert not fused_calls


def _op_args(device: str, dtype: torch.dtype = torch.float32, B: int = 2, G: int = 3, D: int = 10, K: int = 4):
    gen = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    kv = randn(B, (G + 1) * D)
    args = (
        randn(B, G, D),
        kv[:, D:].unflatten(-1, (G, D)),
        kv[:, :D],
        1 + 0.3 * randn(G, D),
        1 + 0.3 * randn(G, D),
        0.5 * randn(G * D, 1, K),
        1 + 0.3 * randn(G, D),
        randn(B, (K - 1) * 3, G, D),
    )
    return args, {"dilation": 3, "eps": None, "scale": None, "signed_sqrt": True, "sqrt_clamp": 1e-6, "conv_eps": 1e-5}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    args, kwargs = _op_args(device)
    torch.library.opcheck(torch.ops.retrieval_attention.decode_step.default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_form_and_the_state_version(device: str) -> None:
    args, kwargs = _op_args(device, torch.float64)
    state = args[-1]
    before, version = state.clone(), state._version
    y, a = ra.decode_step(*args, **kwargs)
    assert state._version > version  # updated in place: autograd's version counter says so
    assert torch.equal(state[:, :-1], before[:, 1:])
    h, k, v = args[:3]
    o, want_a = ra.gate(h, k, v, args[3], args[4])
    torch.testing.assert_close(state[:, -1], o, rtol=0, atol=DECODE_ATOL)
    torch.testing.assert_close(a, want_a, rtol=0, atol=DECODE_ATOL)
    assert y.shape == h.shape and a.shape == h.shape[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(8))
def test_inputs_requiring_grad_raise(device: str, index: int) -> None:
    args, kwargs = _op_args(device)
    names = ["h", "k", "v", "w_q", "w_k", "conv_weight", "conv_norm_weight", "conv_state"]
    args = list(args)
    args[index] = args[index].detach().requires_grad_()
    before = args[-1].detach().clone()
    with pytest.raises(RuntimeError, match=f"`{names[index]}` requires grad"):
        ra.decode_step(*args, **kwargs)
    assert torch.equal(args[-1].detach(), before)
    with torch.no_grad():
        ra.decode_step(*args, **kwargs)  # inference: the same inputs are fine


def test_compile_fullgraph_without_recompiles() -> None:
    torch._dynamo.reset()  # forward compiled by other tests (with grad mode on) would count as a recompile
    block = _block(2, 16, 4, 3, "cpu")
    hidden, retrieved = _inputs(2, 6, 2, 16, "cpu", torch.float64, 11)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        want = block(hidden, retrieved)
        state = block.new_conv_state(2)
        got = [compiled(hidden[:, t : t + 1], retrieved[:, t : t + 1], conv_state=state) for t in range(6)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@NEEDS_CUDA
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    args, kwargs = _op_args("cpu", dtype, B=5, G=3, D=70, K=4)
    cuda_args = tuple(t.cuda() for t in args)
    y, a = ra.decode_step(*args, **kwargs)
    cy, ca = ra.decode_step(*cuda_args, **kwargs)
    assert_agree(cy, y, "y", dtype)
    assert_agree(ca, a, "a", dtype)
    assert_agree(cuda_args[-1], args[-1], "conv_state", dtype)


@NEEDS_CUDA
def test_cuda_graph_capture_of_a_decode_step() -> None:
    """A module's decode step captured once, replayed with new tokens copied into static inputs, equals eager."""
    block = _block(2, 64, 4, 3, "cuda", torch.float32)
    B, T = 4, 8
    hidden, retrieved = _inputs(B, T, 2, 64, "cuda", torch.float32, 13)
    static_h, static_r = hidden[:, :1].clone(), retrieved[:, :1].clone()
    graph_state, eager_state = block.new_conv_state(B), block.new_conv_state(B)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, on a scratch state
            block(static_h, static_r, conv_state=graph_state.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = block(static_h, static_r, conv_state=graph_state)
        for t in range(T):
            static_h.copy_(hidden[:, t : t + 1])
            static_r.copy_(retrieved[:, t : t + 1])
            graph.replay()
            want = block(hidden[:, t : t + 1], retrieved[:, t : t + 1], conv_state=eager_state)
            assert_agree(static_y, want, "y")  # the projection's GEMM may pick another algorithm when captured
            assert_agree(graph_state, eager_state, "conv_state")


def _bad_call(index: int, bad: torch.Tensor | None = None, **kwargs: object):
    def build():
        args, good_kwargs = _op_args("cpu")
        args = list(args)
        if bad is not None:
            args[index] = bad
        return ra.decode_step, tuple(args), {**good_kwargs, **kwargs}

    return build


def _state(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


# Good shapes: h [2, 3, 10], k [2, 3, 10], v [2, 10], conv_weight [30, 1, 4], conv_state [2, 9, 3, 10].
CASES: dict[str, BadCase] = {
    "conv_state-shape": BadCase(_bad_call(7, _state(2, 8, 3, 10)), ValueError, "`conv_state`"),
    "conv_state-batch": BadCase(_bad_call(7, _state(3, 9, 3, 10)), ValueError, "`conv_state`"),
    "conv_state-dtype": BadCase(_bad_call(7, _state(2, 9, 3, 10, dtype=torch.float64)), TypeError, "`conv_state`"),
    "conv_state-strided": BadCase(
        _bad_call(7, _state(2, 3, 10, 9).transpose(1, 3).transpose(2, 3)), ValueError, "`conv_state`"
    ),
    "h-two-tokens": BadCase(_bad_call(0, _state(2, 2, 3, 10)), ValueError, "`h`"),
    "h-rank": BadCase(_bad_call(0, _state(3, 10)), ValueError, "`h`"),
    "h-dtype": BadCase(_bad_call(0, _state(2, 3, 10, dtype=torch.int64)), TypeError, "`h`"),
    "k-shape": BadCase(_bad_call(1, _state(2, 2, 10)), ValueError, "`k`"),
    "v-shape": BadCase(_bad_call(2, _state(2, 9)), ValueError, "`v`"),
    "w_q-shape": BadCase(_bad_call(3, _state(3, 9)), ValueError, "`w_q`"),
    "conv_weight-shape": BadCase(_bad_call(5, _state(30, 4)), ValueError, "`conv_weight`"),
    "conv_weight-dtype": BadCase(_bad_call(5, _state(30, 1, 4, dtype=torch.float64)), TypeError, "`conv_weight`"),
    "conv_norm_weight-shape": BadCase(_bad_call(6, _state(3, 9)), ValueError, "`conv_norm_weight`"),
    "dilation-0": BadCase(_bad_call(0, dilation=0), ValueError, "`dilation`"),
    "conv_eps-negative": BadCase(_bad_call(0, conv_eps=-1.0), ValueError, "`conv_eps`"),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
