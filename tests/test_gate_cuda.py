"""CUDA-only checks: CPU and CUDA agree, Engram-sized rows, unaligned rows, CUDA graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retrieval_attention import gate, reference

import gate_harness
from conftest import DTYPES, NEEDS_CUDA
from gate_harness import GateCase, check
from tolerances import assert_agree, assert_close_to_truth

pytestmark = NEEDS_CUDA

AGREEMENT_OPTIONS = [{}, {"w_q": "none", "w_k": "none", "residual": True, "mask": True}, {"fused_kv": True}]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", range(len(AGREEMENT_OPTIONS)))
def test_cpu_and_cuda_agree(dtype: torch.dtype, option: int, seed: int) -> None:
    """The same inputs on both devices: CUDA is as close to the CPU kernel as the CPU kernel is to the truth."""
    case = GateCase((37,), 3, 264, dtype=dtype, seed=seed, **AGREEMENT_OPTIONS[option])
    vals = gate_harness.values(case)
    cpu_views = gate_harness.inputs(case, vals)
    cpu = gate_harness.run_gate(case, cpu_views, vals)
    truth = gate_harness.reference(case, cpu_views, vals, truth=True)
    cuda_case = dataclasses.replace(case, device="cuda")
    gpu = gate_harness.run_gate(cuda_case, gate_harness.inputs(cuda_case, vals), vals)
    for name, ours in gpu.items():
        assert_close_to_truth(ours.cpu(), cpu[name], truth[name], dtype, f"CUDA vs CPU {name}")


@pytest.mark.parametrize("D", [2560, 4096, 7168])
def test_engram_sizes_bfloat16(D: int, seed: int) -> None:
    """N = 8192 tokens, 4 branches; 2560 is Engram-27B's hidden size, 4096 and 7168 DeepSeek's."""
    check(GateCase((8192,), 4, D, dtype=torch.bfloat16, device="cuda", mask=True, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_rows(dtype: torch.dtype, seed: int) -> None:
    """Rows starting one element past a 16-byte boundary: D off the pack (scalar path), then on it (shifted packs)."""
    check(GateCase((11,), 2, 67, dtype=dtype, device="cuda", fused_kv=True, residual=True, seed=seed))
    check(GateCase((11,), 2, 64, dtype=dtype, device="cuda", fused_kv=True, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [72, 67], ids=["vector", "scalar"])
def test_blocks_loop_over_tokens_and_rows(dtype: torch.dtype, D: int, seed: int) -> None:
    """More tokens than the GPU holds blocks: backward blocks take several tokens, forward blocks several rows."""
    tokens = 64 * torch.cuda.get_device_properties(0).multi_processor_count + 3
    check(GateCase((tokens,), 5, D, dtype=dtype, device="cuda", residual=True, mask=True, seed=seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_load_shifted_packs(dtype: torch.dtype, seed: int) -> None:
    """h one element past the 16-byte grid, k and v with rows D + 1 apart (every shift of a pack)."""
    layouts = gate_harness.laid_out("offset", "h") + gate_harness.laid_out("sliced", "k", "v")
    check(GateCase((129,), 4, 64, dtype=dtype, device="cuda", layouts=layouts, residual=True, seed=seed))


def test_offset_storage() -> None:
    N, G, D = 9, 2, 128
    base = torch.randn(N * G * D + 1, device="cuda")
    h = base[1:].view(N, G, D)  # 4 bytes past the allocation's alignment
    k, v = torch.randn(N, G, D, device="cuda"), torch.randn(N, D, device="cuda")
    o, a = gate(h, k, v)
    ref_o, ref_a = reference.gate(h, k, v)
    assert_agree(o, ref_o, "o")
    assert_agree(a, ref_a, "a")


def test_cuda_graph_capture_and_replay() -> None:
    """No host sync, no allocation outside the caching allocator: forward and backward replay in a graph."""
    N, G, D = 64, 4, 256
    h, k = torch.randn(N, G, D, device="cuda"), torch.randn(N, G, D, device="cuda")
    v, w_q, w_k = torch.randn(N, D, device="cuda"), torch.rand(G, D, device="cuda"), torch.rand(G, D, device="cuda")
    go = torch.randn(N, G, D, device="cuda")

    def step() -> tuple[torch.Tensor, ...]:
        o, a, stats = torch.ops.retrieval_attention.gate(h, k, v, w_q, w_k)
        grads = torch.ops.retrieval_attention.gate_backward(
            grad_o=go, grad_a=None, a=a, stats=stats, h=h, k=k, v=v, w_q=w_q, w_k=w_k, mask=None
        )
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
        for name, g, e in zip(("h", "k", "v", "w_q", "w_k"), grads, eager, strict=True):
            assert_agree(g, e, f"grad {name}")


def test_many_branches_backward_or_a_named_limit() -> None:
    """The backward's shared memory grows with G: 1024 branches work; 1 << 16 get an error naming G."""
    check(GateCase((3,), 1024, 8, device="cuda", seed=7))
    h = torch.randn(2, 1 << 16, 1, device="cuda", requires_grad=True)
    o, _ = gate(h, torch.randn_like(h), torch.randn(2, 1, device="cuda"))
    with pytest.raises(ValueError, match=r"at most \d+ branches \(G\).*has 65536"):
        o.sum().backward()
