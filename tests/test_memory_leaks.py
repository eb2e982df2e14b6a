"""No leaks: resident memory stays flat over thousands of calls.

After a warm-up, thousands of forward+backward calls of the gate over varying shapes, dtypes and
options, with ``ngram_hash``, the modules and failing calls mixed in, keep the process's resident
memory (``/proc/self/statm``) flat. ``RA_LEAK_CALLS`` sets the number of gate calls (default 2000)
for a longer run, e.g. ``RA_LEAK_CALLS=100000 pytest -s tests/test_memory_leaks.py``.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import time

import pytest
import torch

import retrieval_attention

import gate_harness
from gate_harness import GateCase, laid_out

LEAK_CALLS = int(os.environ.get("RA_LEAK_CALLS", "2000"))
# Intra-op threads of the leak loop: 1 by default, as OpenMP's spinning threads make small calls
# ten times slower on a loaded machine; the parallel paths allocate nothing of their own, and
# tests/test_threads.py runs them. RA_LEAK_THREADS=2 runs the loop with two.
LEAK_THREADS = int(os.environ.get("RA_LEAK_THREADS", "1"))
# Growth allowed over the measured calls, with glibc's free heap trimmed before each reading. Each
# call allocates and frees tensors of 0..100 KB; an [N, G, D] tensor of the configs below averages
# about 6 KB, so leaking one of them per call fails the bound (tried: keeping every call's ``o``
# alive grows RSS by 17.4 MiB over 2000 calls). Allocator bookkeeping, torch's caches and
# fragmentation stay under 2 MiB here (1.5 MiB measured). Smaller leaks (keeping every ``a``, an
# [N, G] tensor: +3.1 MiB) pass at 2000 calls and show with a larger RA_LEAK_CALLS, as the bound
# does not grow with the count.
LEAK_BOUND_MIB = 8.0

UNDER_ASAN = "RA_ASAN_LIB" in os.environ or "libasan" in os.environ.get("LD_PRELOAD", "")

MULTIPLIERS = torch.tensor([3, 5, 7, 11], dtype=torch.int64) * 1_000_003 + 1
PRIMES = torch.tensor([[101, 103], [107, 109], [113, 127]], dtype=torch.int64)


def _rss_bytes() -> int:
    """Resident set size: the second field of /proc/self/statm, in pages."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Collect Python garbage and hand glibc's free heap pages back, so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# Gate configurations the leak loop cycles through: every dtype, weight kind, layout and option.
_LEADS = [(0,), (1,), (5,), (3, 7), (64,), (2, 33)]
_GDS = [(1, 1), (2, 5), (3, 32), (1, 64), (2, 64)]
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_WEIGHTS = [{}, {"w_q": "none", "w_k": "none"}, {"w_k": "none"}, {"w_q": "float32", "w_k": "float32"}]
_LAYOUTS = [{}, {"layouts": laid_out("branch_major", "h", "k")}, {"layouts": laid_out("strided", "h", "k")}]
_LAYOUTS.append({"fused_kv": True})


def _leak_configs() -> list[GateCase]:
    configs = []
    for i, (lead, (G, D)) in enumerate(itertools.product(_LEADS, _GDS)):
        options = {**_WEIGHTS[(i // 4) % 4], **_LAYOUTS[(i // 2) % 4]}
        configs.append(
            GateCase(
                lead,
                G,
                D,
                dtype=_DTYPES[i % 4],
                residual=i % 3 == 0,
                mask=i % 5 == 1,
                signed_sqrt=i % 7 != 2,
                uses="both" if i % 2 == 0 else "o",
                seed=i,
                **options,
            )
        )
    return configs


LEAK_CONFIGS = _leak_configs()


def _gate_step(case: GateCase) -> None:
    """One forward and backward of the gate on fresh inputs."""
    vals = gate_harness.values(case)
    gate_harness.run_gate(case, gate_harness.inputs(case, vals), vals)


# The module steps cycle through B (3 values), T (13) and the two blocks: 78 distinct calls. The
# warm-up makes every one of them, as oneDNN's primitive cache (the projection's float32 products on
# the CPU) keeps a primitive per shape: bounded, but new shapes after the warm-up would grow RSS.
MODULE_STEP_CYCLE = 78


def _module_step(modules: dict[str, torch.nn.Module], i: int) -> None:
    B, T = 1 + i % 3, 1 + (7 * i) % 13
    ids = torch.randint(0, 80, (B, T))
    e = modules["embedding"](ids)
    attention = modules["attention_conv" if i % 2 else "attention_plain"]
    G = attention.num_branches
    hidden = torch.randn(B, T, G, 16, requires_grad=True)
    y = attention(hidden, e)
    params = [hidden, *attention.parameters(), modules["embedding"].embedding.weight]
    torch.autograd.grad(y.square().sum(), params)


def _bad_call(i: int) -> None:
    """A failing call (a bad input), so that the error paths are covered too."""
    with pytest.raises((ValueError, TypeError)):
        if i % 2:
            retrieval_attention.gate(torch.randn(4, 2, 8), torch.randn(4, 2, 9), torch.randn(4, 8))
        else:
            retrieval_attention.ngram_hash(torch.tensor([[1, -2, 3]]), MULTIPLIERS, PRIMES, pad_id=0)


def _leak_loop(calls: int, modules: dict[str, torch.nn.Module]) -> None:
    for i in range(calls):
        _gate_step(LEAK_CONFIGS[i % len(LEAK_CONFIGS)])
        if i % 4 == 0:
            with torch.no_grad():  # the inference path: no statistics saved
                case = LEAK_CONFIGS[(i // 4) % len(LEAK_CONFIGS)]
                h, k = torch.randn(*case.lead, case.G, case.D), torch.randn(*case.lead, case.G, case.D)
                retrieval_attention.gate(h, k, torch.randn(*case.lead, case.D))
            B, T = i % 5, 1 + (31 * i) % 200
            retrieval_attention.ngram_hash(torch.randint(0, 1000, (B, T)), MULTIPLIERS, PRIMES, pad_id=i % 7)
        if i % 8 == 0:
            _module_step(modules, i // 8)
            _bad_call(i // 8)


def _measure(modules: dict[str, torch.nn.Module]) -> tuple[int, int, float]:
    # Warm-up: every configuration more than once, so the dispatcher's, autograd's and the
    # allocator's caches and the thread pool reach their steady state before the first reading.
    _leak_loop(max(2 * len(LEAK_CONFIGS), MODULE_STEP_CYCLE) * 8, modules)
    _trim_heap()
    before = _rss_bytes()
    start = time.perf_counter()
    _leak_loop(LEAK_CALLS, modules)
    seconds = time.perf_counter() - start
    _trim_heap()
    return before, _rss_bytes(), seconds


@pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer's quarantine keeps freed memory resident")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_resident_memory_stays_flat(record_property, small_modules: dict[str, torch.nn.Module]) -> None:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(LEAK_THREADS)
    try:
        before, after, seconds = _measure(small_modules)
    finally:
        torch.set_num_threads(previous_threads)
    delta_mib = (after - before) / 2**20
    record_property("rss_delta_mib", round(delta_mib, 3))
    print(
        f"\nleak check: {LEAK_CALLS} gate forward+backward calls (+ {LEAK_CALLS // 4} ngram_hash and inference "
        f"calls, {LEAK_CALLS // 8} module steps, {LEAK_CALLS // 8} failing calls; {LEAK_THREADS} intra-op "
        f"thread(s)) in {seconds:.1f} s: RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
        f"delta {delta_mib:+.2f} MiB (bound {LEAK_BOUND_MIB} MiB)"
    )
    assert delta_mib < LEAK_BOUND_MIB, f"resident memory grew by {delta_mib:.2f} MiB over {LEAK_CALLS} calls"
