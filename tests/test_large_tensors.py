"""Tensors of more than 2**31 elements: opt-in, run with RA_LARGE_TESTS=1.

A tensor of more than 2^31 elements works: every size computation in the kernels is 64-bit
(docs/api.md). Each test prints its sizes, time and peak memory (run with -s to see them):

    RA_LARGE_TESTS=1 pytest tests/test_large_tensors.py -s

What is covered, and the memory it takes (bfloat16, 2 bytes an element):

- gate forward, N * G * D = 2**31 + 2**28 elements, with ``h`` materialized (4.8 GB: reads past
  element 2**31) and the output ``o`` (4.8 GB: writes past it); ``k`` and ``v`` are overlapping
  windows of small tensors (row n starts at element n: distinct rows, no memory). Peak RSS 10.8 GiB.
- gate backward at the same size: ``grad_h`` and ``grad_k`` (4.8 GB each) are written past element
  2**31; ``h``, ``k``, ``v`` and ``grad_o`` are windows. The registered ``gate_backward`` operator is
  called directly, so that the forward's ``o`` can be freed first (autograd would keep it); its
  ``grad_v`` [N, D] is 1.2 GB and its weight gradients sum over all N rows. Peak RSS 13.6 GiB.
- ngram_hash with an output of 2**29 + 2**16 int64 elements: 4.3 GB, more than 2**32 bytes.
  Peak RSS 5.1 GiB.
- ngram_hash with more than 2**31 output elements (17.2 GB of int64): only where that much memory
  is free with a margin (a GPU); skipped, with the reason, elsewhere (a 24 GiB machine).

Measured on a shared 2-core CPU machine: forward 51 s, backward 67 s, ngram_hash 17 s, most of it
page faults of the fresh multi-GB tensors.

Every output is checked completely: chunk by chunk against the operator run on that chunk alone
(whose size the rest of the suite covers), bitwise on the CPU; and sampled rows (the first, the
last, and those around element 2**30 and 2**31) against the plain-PyTorch reference.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator

import pytest
import torch

import retrieval_attention
from retrieval_attention import reference

from conftest import DEVICES
from tolerances import assert_agree, assert_close_to_truth, tolerance

pytestmark = pytest.mark.skipif(
    os.environ.get("RA_LARGE_TESTS") != "1",
    reason="opt-in: set RA_LARGE_TESTS=1 to run the tests of more than 2**31 elements (up to ~14 GiB of memory)",
)

GiB = 2**30
DTYPE = torch.bfloat16
G, D = 4, 64
N = 2**23 + 2**20  # rows: N * G * D = 2**31 + 2**28 elements
CHUNK_ROWS = 2**20


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _require_memory(device: str, needed: float, margin: float = 1.15) -> None:
    available = _available_bytes(device)
    if available < needed * margin:
        pytest.skip(f"needs {needed * margin / GiB:.1f} GiB free on {device}, {available / GiB:.1f} GiB is")


class _Peak:
    """Peak memory of the process (CPU: VmHWM, reset through /proc/self/clear_refs) or of the device."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # resets the peak resident set size to the current one
            except OSError:  # pragma: no cover - then the peak is that of the whole run so far
                pass
        self.start = time.perf_counter()

    def report(self, what: str) -> str:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = f"peak CUDA memory {torch.cuda.max_memory_allocated() / GiB:.2f} GiB"
        else:
            with open("/proc/self/status") as status:
                hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
            peak = f"peak RSS {hwm * 1024 / GiB:.2f} GiB"
        line = f"\n[large] {what} on {self.device}: {time.perf_counter() - self.start:.1f} s, {peak}"
        print(line)
        return line


def _windows(rows: int, row_shape: tuple[int, ...], device: str, seed: int) -> torch.Tensor:
    """``[rows, *row_shape]`` with row ``n`` = ``base[n : n + row size]``: distinct rows, in little memory.

    Rows are contiguous inside (the kernels' fast path); their stride is 1 element.
    """
    size = math.prod(row_shape)
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(rows + size, generator=g, device=device).to(DTYPE)
    inner = [math.prod(row_shape[i + 1 :]) for i in range(len(row_shape))]
    return base.as_strided((rows, *row_shape), (1, *inner))


def _weights(device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(1 + 0.3 * torch.randn(G, D, generator=g, device=device) for _ in range(2))


def _chunks(rows: int, step: int = CHUNK_ROWS) -> Iterator[slice]:
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _sample_rows(rows: int, row_elements: int) -> torch.Tensor:
    """The first and last rows, and those around element 2**30 and 2**31 (byte 2**31 and 2**32)."""
    picks = [torch.arange(0, 32), torch.arange(rows - 32, rows)]
    for element in (2**30, 2**31):
        boundary = element // row_elements
        if 0 < boundary < rows:
            picks.append(torch.arange(max(0, boundary - 32), min(rows, boundary + 32)))
    return torch.cat(picks).unique()


def _assert_chunk_equal(full: torch.Tensor, chunk: torch.Tensor, device: str, what: str) -> None:
    if device == "cpu":  # the same kernel on the same rows: bitwise
        assert torch.equal(full, chunk), f"{what}: differs from the operator run on the chunk alone"
    else:  # the launch configuration may depend on N
        assert_agree(full, chunk, what)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_forward_over_2e31_elements(device: str) -> None:
    numel = N * G * D
    assert numel > 2**31
    _require_memory(device, 2 * numel * 2 + 2 * GiB)
    peak = _Peak(device)
    h = _windows(N, (G, D), device, seed=1).clone()  # materialized: reads past element 2**31
    k = _windows(N, (G, D), device, seed=2)
    v = _windows(N, (D,), device, seed=3)
    w_q, w_k = _weights(device, 4)
    with torch.no_grad():
        o, a = retrieval_attention.gate(h, k, v, w_q, w_k)
        assert o.shape == (N, G, D) and o.is_contiguous() and a.shape == (N, G)

        rows = _sample_rows(N, G * D).to(device)
        eps = torch.finfo(DTYPE).eps
        hs, ks, vs = h[rows], k[rows], v[rows]
        truth = reference.gate(hs.double(), ks.double(), vs.double(), w_q.double(), w_k.double(), eps=eps)
        same = reference.gate(hs, ks, vs, w_q, w_k, eps=eps)
        assert_close_to_truth(o[rows], truth[0], same[0], DTYPE, "o (sampled rows)")
        assert_close_to_truth(a[rows], truth[1], same[1], DTYPE, "a (sampled rows)")

        for c in _chunks(N):
            o_c, a_c = retrieval_attention.gate(h[c], k[c], v[c], w_q, w_k)
            _assert_chunk_equal(o[c], o_c, device, f"o rows {c.start}:{c.stop}")
            _assert_chunk_equal(a[c], a_c, device, f"a rows {c.start}:{c.stop}")
    peak.report(f"gate forward, o [{N}, {G}, {D}] {DTYPE} = {numel} elements ({numel / 2**31:.3f} * 2**31)")


def _reference_grads(h, k, v, grad_o, w_q, w_k) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().requires_grad_(True) for t in (h, k, v)]
    o, _ = reference.gate(*leaves, w_q, w_k, eps=torch.finfo(DTYPE).eps)
    return torch.autograd.grad(o, leaves, grad_o)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_backward_over_2e31_elements(device: str) -> None:
    numel = N * G * D
    _require_memory(device, 2 * numel * 2 + N * D * 2 + N * G * 16 + 3 * GiB)
    peak = _Peak(device)
    h, k = _windows(N, (G, D), device, seed=5), _windows(N, (G, D), device, seed=6)
    v, grad_o = _windows(N, (D,), device, seed=7), _windows(N, (G, D), device, seed=8)
    w_q, w_k = _weights(device, 9)  # float32: their gradients are float32 sums over all N rows
    options = {"mask": None, "scale": None, "signed_sqrt": True, "sqrt_clamp": 1e-6, "residual": False}

    o, a, stats = torch.ops.retrieval_attention.gate(h, k, v, w_q, w_k)
    del o  # only a and the per-row statistics are needed for the backward
    dh, dk, dv, dw_q, dw_k = torch.ops.retrieval_attention.gate_backward(
        grad_o=grad_o, grad_a=None, a=a, stats=stats, h=h, k=k, v=v, w_q=w_q, w_k=w_k, **options
    )
    assert dh.shape == dk.shape == (N, G, D) and dv.shape == (N, D) and dw_q.shape == (G, D)
    assert dh.dtype == DTYPE and dw_q.dtype == torch.float32

    # Sampled rows against autograd through the reference, on those rows alone.
    rows = _sample_rows(N, G * D).to(device)
    sampled = [t[rows] for t in (h, k, v, grad_o)]
    truth = _reference_grads(*(t.double() for t in (*sampled, w_q, w_k)))
    same = _reference_grads(*sampled, w_q, w_k)
    for name, ours, t, s in zip(("dh", "dk", "dv"), (dh, dk, dv), truth, same, strict=True):
        assert_close_to_truth(ours[rows], t, s, DTYPE, f"{name} (sampled rows)")

    # Every row, chunk by chunk; the weight gradients as sums of the chunks' (float64 sum).
    dw_sum = [torch.zeros(G, D, dtype=torch.float64, device=device) for _ in range(2)]
    for c in _chunks(N):
        parts = torch.ops.retrieval_attention.gate_backward(
            grad_o=grad_o[c],
            grad_a=None,
            a=a[c],
            stats=stats[:, c],
            h=h[c],
            k=k[c],
            v=v[c],
            w_q=w_q,
            w_k=w_k,
            **options,
        )
        for name, full, part in zip(("dh", "dk", "dv"), (dh, dk, dv), parts[:3], strict=True):
            _assert_chunk_equal(full[c], part, device, f"{name} rows {c.start}:{c.stop}")
        for total, part in zip(dw_sum, parts[3:], strict=True):
            total += part.double()
    for name, full, total in zip(("dw_q", "dw_k"), (dw_q, dw_k), dw_sum, strict=True):
        scale = total.abs().max().item()
        err = (full.double() - total).abs().max().item()
        # Both are float32 sums over 9.4M rows in different groupings; a row read from the wrong
        # place would change a ninth of the terms and the sum by about its own size.
        tol = tolerance(torch.float32, "regrouped_sum")
        assert err <= tol * scale, f"{name}: max error {err:.3e} against the chunks' sum (scale {scale:.3e})"
    peak.report(f"gate backward, grad_h and grad_k [{N}, {G}, {D}] {DTYPE} = {numel} elements each")


def _ngram_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    multipliers, primes = retrieval_attention.ngram_hash_tables([100003, 200003], 8, token_vocab_size=129280)[0]
    return multipliers.to(device), primes.to(device)  # max_n = 3, H = 8: 16 ids per token


def _check_ngram(B: int, T: int, device: str, what: str) -> None:
    multipliers, primes = _ngram_tables(device)
    K = primes.numel()
    numel = B * T * K
    _require_memory(device, numel * 8 + B * T * 8 + 2 * GiB, margin=1.3)
    peak = _Peak(device)
    g = torch.Generator(device=device).manual_seed(10)
    ids = torch.randint(0, 129280, (B, T), generator=g, device=device)
    out = retrieval_attention.ngram_hash(ids, multipliers, primes, pad_id=2)
    assert out.shape == (B, T, K) and out.dtype == torch.int64
    # Sampled sequences against the reference (a sequence's hashes depend on it alone).
    for b in _sample_rows(B, T * K).tolist():
        expected = reference.ngram_hash(ids[b : b + 1], multipliers, primes, pad_id=2)
        assert torch.equal(out[b : b + 1], expected), f"sequence {b} differs from the reference"
    for c in _chunks(B, max(1, 2**24 // (T * K))):
        part = retrieval_attention.ngram_hash(ids[c], multipliers, primes, pad_id=2)
        assert torch.equal(out[c], part), f"sequences {c.start}:{c.stop} differ from the operator on them alone"
    size = f"{numel} elements = {numel * 8} bytes ({numel * 8 / 2**32:.5f} * 2**32)"
    peak.report(f"{what}, out [{B}, {T}, {K}] int64 = {size}")


@pytest.mark.parametrize("device", DEVICES)
def test_ngram_hash_output_over_4_gib(device: str) -> None:
    B, T = 8193, 4096  # 16 ids a token: 2**29 + 2**16 elements, 4.3 GB, bytes past 2**32
    _check_ngram(B, T, device, "ngram_hash over 2**32 bytes")


@pytest.mark.parametrize("device", DEVICES)
def test_ngram_hash_over_2e31_elements(device: str) -> None:
    B, T = 32769, 4096  # 2**31 + 2**16 elements: 17.2 GB of int64
    _check_ngram(B, T, device, "ngram_hash over 2**31 elements")
