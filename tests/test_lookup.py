"""The table lookup operator (docs/ngram.md) against F.embedding, inside PyTorch's machinery, on every device in
conftest.DEVICES (the CUDA cases skip, visibly, without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_attention as ra

import bad_input
from bad_input import BadCase
from conftest import DEVICES, DTYPES
from tolerances import assert_agree, assert_close_to_truth

ops = torch.ops.retrieval_attention

# (rows, dim, index shape): repeated rows (indices drawn from few rows), odd dims, one index, none.
SHAPES = [(50, 16, (2, 30, 4)), (7, 33, (5, 9)), (1000, 64, (1, 512, 16)), (3, 5, (1,)), (11, 8, (0, 4))]


def _inputs(rows: int, dim: int, index_shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    indices = torch.randint(0, rows, index_shape, generator=gen)
    grad = torch.randn(*index_shape, dim, generator=gen, dtype=torch.float64)
    return weight.to(device, dtype), indices.to(device), grad.to(device, dtype)


def _run(fn, weight: torch.Tensor, indices: torch.Tensor, grad: torch.Tensor):
    w = weight.detach().clone().requires_grad_()
    out = fn(w, indices)
    return out, torch.autograd.grad(out, w, grad)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_embedding(shape, dtype: torch.dtype, device: str, seed: int) -> None:
    weight, indices, grad = _inputs(*shape, dtype, device, seed)
    out, grad_w = _run(ops.lookup, weight, indices, grad)
    truth = _run(lambda w, i: F.embedding(i, w), weight.double(), indices, grad.double())
    same = _run(lambda w, i: F.embedding(i, w), weight.float(), indices, grad.float())
    assert out.dtype == grad_w.dtype == dtype
    assert torch.equal(out, weight[indices])  # a gather: exact
    assert_close_to_truth(grad_w, truth[1], same[1], dtype, "grad_weight")


def test_gradient_is_the_same_bits_for_any_thread_count(seed: int) -> None:
    _, indices, grad = _inputs(97, 40, (4, 200, 8), torch.float32, "cpu", seed)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.lookup_backward(grad, indices, 97))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_strided_indices_and_grad() -> None:
    _, indices, grad = _inputs(30, 12, (6, 5), torch.float32, "cpu", 3)
    indices_t, grad_t = indices.t().contiguous().t(), grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not indices_t.is_contiguous() and not grad_t.is_contiguous()
    assert_agree(ops.lookup_backward(grad_t, indices_t, 30), ops.lookup_backward(grad, indices, 30))


def test_gradcheck_float64() -> None:
    weight, indices, _ = _inputs(9, 3, (4, 5), torch.float64, "cpu", 0)
    assert torch.autograd.gradcheck(lambda w: ops.lookup(w, indices), (weight.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype: torch.dtype) -> None:
    weight, indices, grad = _inputs(20, 6, (3, 7), dtype, "cpu", 1)
    torch.library.opcheck(ops.lookup, (weight.requires_grad_(), indices))
    torch.library.opcheck(ops.lookup_backward, (grad, indices, 20))


def test_embedding_module_uses_it_on_the_cpu() -> None:
    """The dense CPU table: the operator; sparse gradients: nn.Embedding's own."""
    memory = ra.NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=50)
    sparse = ra.NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=50, sparse=True)
    ids = torch.randint(0, 50, (2, 9))

    def ops_run(module) -> set[str]:
        with torch.profiler.profile() as prof:
            module(ids).sum().backward()
        return {e.key for e in prof.key_averages()}

    assert "retrieval_attention::lookup_backward" in ops_run(memory)
    assert "retrieval_attention::lookup_backward" not in ops_run(sparse)


def test_compiles_without_graph_break_or_recompile() -> None:
    torch._dynamo.reset()  # the class's forward compiled by other tests would count as a recompile
    memory = ra.NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=50)
    compiled = torch.compile(memory, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
            assert torch.equal(compiled(ids), memory(ids))


def _call(op, *args):
    return lambda: (op, args, {})


CASES: dict[str, BadCase] = {
    "lookup-indices-float": BadCase(_call(ops.lookup, torch.zeros(4, 3), torch.zeros(2)), TypeError, "`indices`"),
    "lookup-weight-1d": BadCase(
        _call(ops.lookup, torch.zeros(4), torch.zeros(2, dtype=torch.int64)), ValueError, "`weight`"
    ),
    "lookup-out-of-range": BadCase(_call(ops.lookup, torch.zeros(4, 3), torch.tensor([0, 4])), IndexError, "`indices`"),
    "lookup-negative": BadCase(_call(ops.lookup, torch.zeros(4, 3), torch.tensor([-1, 2])), IndexError, "`indices`"),
    "lookup_backward-grad-shape": BadCase(
        _call(ops.lookup_backward, torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64), 4), ValueError, "`grad`"
    ),
    "lookup_backward-out-of-range": BadCase(
        _call(ops.lookup_backward, torch.zeros(2, 5), torch.tensor([1, 9]), 4), IndexError, "`indices`"
    ),
    "lookup_backward-num-rows": BadCase(
        _call(ops.lookup_backward, torch.zeros(2, 5), torch.tensor([1, 0]), -1), ValueError, "`num_rows`"
    ),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
