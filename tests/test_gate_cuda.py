"""CUDA-only checks: CPU and CUDA agree, Engram-sized rows, unaligned rows, CUDA graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retrieval_attention import gate, reference

from conftest import DTYPES, HAS_CUDA
from gate_cases import Case, as_float64, check_against_reference, make_leaves, run
from tolerances import assert_close_to_truth

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")

AGREEMENT_OPTIONS = [{}, {"weights": "none", "residual": True, "mask": True}, {"layout": "fused_kv"}]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", range(len(AGREEMENT_OPTIONS)))
def test_cpu_and_cuda_agree(dtype: torch.dtype, option: int) -> None:
    """The same inputs on both devices: CUDA is as close to the CPU kernel as the CPU kernel is to the truth."""
    case = Case((37,), 3, 264, dtype=dtype, **AGREEMENT_OPTIONS[option])
    leaves = make_leaves(case)
    mask = torch.rand(case.lead) > 0.3 if case.mask else None
    grad_o = torch.randn(*case.lead, case.G, case.D, dtype=torch.float64)
    grad_a = torch.randn(*case.lead, case.G, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    cpu = run(case, gate, leaves, grad_o, grad_a, mask)
    truth = run(case, reference.gate, as_float64(leaves), grad_o, grad_a, mask, eps=eps)

    cuda_case = dataclasses.replace(case, device="cuda")
    cuda_leaves = {n: None if t is None else t.detach().cuda().requires_grad_(True) for n, t in leaves.items()}
    on_cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    gpu = run(cuda_case, gate, cuda_leaves, grad_o.cuda(), grad_a.cuda(), on_cuda(mask))

    for i, what in enumerate(("o", "a")):
        assert_close_to_truth(gpu[0][i].cpu(), cpu[0][i], truth[0][i], dtype, f"CUDA vs CPU {what}")
    for name, grad in gpu[1].items():
        assert_close_to_truth(grad.cpu(), cpu[1][name], truth[1][name], dtype, f"CUDA vs CPU grad {name}")


@pytest.mark.parametrize("D", [2560, 4096, 7168])
def test_engram_sizes_bfloat16(D: int) -> None:
    """N = 8192 tokens, 4 branches; 2560 is Engram-27B's hidden size, 4096 and 7168 DeepSeek's."""
    check_against_reference(Case((8192,), 4, D, dtype=torch.bfloat16, device="cuda", mask=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_rows_take_the_scalar_path(dtype: torch.dtype) -> None:
    """Rows starting one element past a 16-byte boundary (and D not a multiple of the pack)."""
    check_against_reference(Case((11,), 2, 67, dtype=dtype, device="cuda", layout="fused_kv", residual=True))
    check_against_reference(Case((11,), 2, 64, dtype=dtype, device="cuda", layout="fused_kv"))


def test_offset_storage() -> None:
    N, G, D = 9, 2, 128
    base = torch.randn(N * G * D + 1, device="cuda")
    h = base[1:].view(N, G, D)  # 4 bytes past the allocation's alignment
    k, v = torch.randn(N, G, D, device="cuda"), torch.randn(N, D, device="cuda")
    o, a = gate(h, k, v)
    ref_o, ref_a = reference.gate(h, k, v)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(a, ref_a)


def test_cuda_graph_capture_and_replay() -> None:
    """No host sync, no allocation outside the caching allocator: forward and backward replay in a graph."""
    N, G, D = 64, 4, 256
    h, k = torch.randn(N, G, D, device="cuda"), torch.randn(N, G, D, device="cuda")
    v, w_q, w_k = torch.randn(N, D, device="cuda"), torch.rand(G, D, device="cuda"), torch.rand(G, D, device="cuda")
    go = torch.randn(N, G, D, device="cuda")

    def step() -> tuple[torch.Tensor, ...]:
        o, a, stats = torch.ops.retrieval_attention.gate(h, k, v, w_q, w_k)
        grads = torch.ops.retrieval_attention.gate_backward(go, None, h, k, v, w_q, w_k, None, a, stats)
        return (o, a, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for t in (h, k, v, go):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        for got, expected in zip(captured, step(), strict=True):
            assert torch.equal(got, expected)


def test_compile_reduce_overhead() -> None:
    def loss(h, k, v, w_q, w_k):
        o, a = gate(h, k, v, w_q, w_k, residual=True)
        return (o.float() ** 2).mean() + a.mean()

    compiled = torch.compile(loss, mode="reduce-overhead", fullgraph=True)
    N, G, D = 256, 4, 512
    for _ in range(3):
        args = [torch.randn(N, G, D, device="cuda") for _ in range(2)] + [torch.randn(N, D, device="cuda")]
        args += [torch.rand(G, D, device="cuda") + 0.5 for _ in range(2)]
        args = [t.requires_grad_(True) for t in args]
        eager_args = [t.detach().clone().requires_grad_(True) for t in args]
        grads = torch.autograd.grad(compiled(*args), args)
        eager = torch.autograd.grad(loss(*eager_args), eager_args)
        for g, e in zip(grads, eager, strict=True):
            torch.testing.assert_close(g, e)
