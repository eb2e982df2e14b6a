"""Thread safety: Python threads and intra-op threads get the results of serial calls, bitwise.

Python threads calling the operators at once on different inputs, or on the very same inputs, get
what serial calls give; one and two intra-op threads give identical outputs and gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

import retrieval_attention

import gate_harness
from gate_harness import GateCase, laid_out

MULTIPLIERS = torch.tensor([3, 5, 7, 11], dtype=torch.int64) * 1_000_003 + 1
PRIMES = torch.tensor([[101, 103], [107, 109], [113, 127]], dtype=torch.int64)


def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (x, y) in enumerate(zip(actual, expected, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}[{i}]: {x.dtype}{list(x.shape)} != {y.dtype}"
        # Bitwise, NaN included: compare the bytes.
        assert torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)), (
            f"{what}[{i}] differs"
        )


def _gate_job(case: GateCase) -> Callable[[], list[torch.Tensor]]:
    """A closure running forward+backward on fixed inputs (made now, on the calling thread)."""
    vals = gate_harness.values(case)
    views = gate_harness.inputs(case, vals)

    def job() -> list[torch.Tensor]:
        result = gate_harness.run_gate(case, views, vals)
        return _snapshot([result[name] for name in sorted(result)])

    return job


def _ngram_job(B: int, T: int, seed: int) -> Callable[[], list[torch.Tensor]]:
    torch.manual_seed(seed)
    ids = torch.randint(0, 2**40, (B, T))

    def job() -> list[torch.Tensor]:
        return [retrieval_attention.ngram_hash(ids, MULTIPLIERS, PRIMES, pad_id=3)]

    return job


def _module_job(modules: dict[str, torch.nn.Module], seed: int) -> Callable[[], list[torch.Tensor]]:
    """The block and the embedding, forward and backward with autograd.grad (nothing accumulates)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 80, (2, 24))
    hidden = torch.randn(2, 24, 2, 16, requires_grad=True)

    def job() -> list[torch.Tensor]:
        y = modules["attention_conv"](hidden, modules["embedding"](ids))
        params = [hidden, *modules["attention_conv"].parameters(), modules["embedding"].embedding.weight]
        return _snapshot([y, *torch.autograd.grad(y.square().sum(), params)])

    return job


NO_WEIGHTS = {"w_q": "none", "w_k": "none"}
FLOAT32_WEIGHTS = {"w_q": "float32", "w_k": "float32"}
THREAD_JOBS = {
    "gate_f32_weights": lambda: _gate_job(GateCase((300,), 2, 64, mask=True, seed=1)),
    "gate_bf16_residual": lambda: _gate_job(GateCase((4, 70), 3, 32, torch.bfloat16, residual=True, seed=2)),
    "gate_f64_plain": lambda: _gate_job(
        GateCase((257,), 1, 40, torch.float64, **NO_WEIGHTS, signed_sqrt=False, seed=3)
    ),
    "gate_f16_fused": lambda: _gate_job(
        GateCase((5, 40), 2, 48, torch.float16, **FLOAT32_WEIGHTS, fused_kv=True, seed=4)
    ),
    "ngram_hash": lambda: _ngram_job(6, 1500, 5),
}


def test_python_threads_match_serial_calls(small_modules: dict[str, torch.nn.Module]) -> None:
    jobs = {name: make() for name, make in THREAD_JOBS.items()}
    jobs["modules"] = _module_job(small_modules, 6)
    expected = {name: job() for name, job in jobs.items()}  # serial, on this thread
    repeats = 8
    barrier = threading.Barrier(len(jobs))
    results: dict[str, list[list[torch.Tensor]]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            barrier.wait()
            results[name] = [jobs[name]() for _ in range(repeats)]
        except BaseException as error:  # reported on the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,), name=f"ra-{name}") for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    assert not errors, f"a worker thread raised: {errors!r}"
    for name, runs in results.items():
        assert len(runs) == repeats
        for i, outputs in enumerate(runs):
            _assert_bitwise(outputs, expected[name], f"{name} run {i}")


def test_same_inputs_from_many_threads_at_once() -> None:
    """Several threads on the very same (read-only) inputs, as a shared module in serving."""
    job = _gate_job(GateCase((500,), 2, 64, torch.bfloat16, **FLOAT32_WEIGHTS, seed=7))
    expected = job()
    barrier = threading.Barrier(4)
    results: list[list[torch.Tensor]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(6):
            out = job()
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 24
    for i, outputs in enumerate(results):
        _assert_bitwise(outputs, expected, f"run {i}")


# Large enough that the forward splits into several parallel tasks (2^15 elements each), the
# backward's weight-gradient sum runs in its 64 chunks, and ngram_hash in several 2048-token tasks.
INTRA_OP_JOBS = {
    "gate_f32_weights_mask": lambda: _gate_job(GateCase((2048,), 2, 64, mask=True, seed=11)),
    "gate_bf16_f32_weights": lambda: _gate_job(GateCase((8, 300), 3, 32, torch.bfloat16, **FLOAT32_WEIGHTS, seed=12)),
    "gate_f16_residual_q": lambda: _gate_job(
        GateCase((1500,), 2, 40, torch.float16, w_k="none", residual=True, seed=13)
    ),
    "gate_f64_branch_major": lambda: _gate_job(
        GateCase((1200,), 2, 33, torch.float64, layouts=laid_out("branch_major", "h", "k"), seed=14)
    ),
    "gate_f32_fused_kv": lambda: _gate_job(GateCase((3, 700), 4, 16, fused_kv=True, seed=15)),
    "ngram_hash": lambda: _ngram_job(5, 4000, 16),
}


@pytest.mark.parametrize("name", list(INTRA_OP_JOBS))
def test_one_and_two_intra_op_threads_are_bitwise_identical(name: str) -> None:
    job = INTRA_OP_JOBS[name]()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = job()
        torch.set_num_threads(2)
        two = job()
        two_again = job()
    finally:
        torch.set_num_threads(previous)
    _assert_bitwise(two, one, f"{name}: 2 threads vs 1")
    _assert_bitwise(two_again, one, f"{name}: 2 threads again vs 1")
