"""RetrievalAttention trained under DDP and FSDP2 (SPEC §6): two gloo ranks on the CPU against one process.

Each test launches two processes of distributed_worker.py (the model, batch and training loop are
shared with the single-process reference below), each training on half of one global batch. The
gradients averaged over the ranks must equal those of one process on the whole batch, at every
step, and so must the parameters after the SGD steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without torch.distributed / gloo"
)

WORLD_SIZE = 2
TIMEOUT_S = 120
TESTS = Path(__file__).resolve().parent
TORCH_EXT = TESTS.parent / "torch_ext"


def _launch(mode: str, tmp_path: Path) -> list[dict]:
    """Run MODE on WORLD_SIZE ranks; return each rank's record. A hang or a failed rank fails the test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TORCH_EXT), str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", PYTHONFAULTHANDLER="1"
    )
    store = tmp_path / "store"  # file:// rendezvous: no port to pick, nothing to collide with
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(WORLD_SIZE)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "distributed_worker.py"), mode, str(store), str(tmp_path)],
            env={**env, "RANK": str(r)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for r, log in enumerate(logs)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    hung = False
    try:
        # Stop at the first failed rank: the others would wait for it in a collective until gloo times out.
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
            if time.monotonic() > deadline:
                hung = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    output = ""
    for r, log in enumerate(logs):
        log.seek(0)
        output += f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}\n"
        log.close()
    if hung:
        pytest.fail(f"{mode}: the ranks did not finish within {TIMEOUT_S} s\n{output}")
    if any(p.returncode for p in procs):
        pytest.fail(f"{mode}: a rank failed\n{output}")
    return [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(WORLD_SIZE)]


def _single_process() -> dict:
    model = worker.make_model()
    return worker.train(model, model, worker.global_batch())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _check_against_single_process(records: list[dict], atol: float, rtol: float) -> float:
    """Every rank's gradients at every step and parameters after the steps match one process; the worst gap."""
    want = _single_process()
    names = set(want["params"])
    worst = 0.0
    for rank, got in enumerate(records):
        assert set(got["params"]) == names, f"rank {rank}"
        for step in range(worker.STEPS):
            assert set(got["grads"][step]) == names, f"rank {rank} step {step}"
            for n in names:
                torch.testing.assert_close(
                    got["grads"][step][n],
                    want["grads"][step][n],
                    atol=atol,
                    rtol=rtol,
                    msg=f"rank {rank} step {step} grad {n}",
                )
            worst = max(worst, _max_diff(got["grads"][step], want["grads"][step]))
        for n in names:
            torch.testing.assert_close(
                got["params"][n], want["params"][n], atol=atol, rtol=rtol, msg=f"rank {rank} {n}"
            )
        worst = max(worst, _max_diff(got["params"], want["params"]))
    # The ranks saw different data (so only the all-reduce can make their gradients agree), and the
    # loss of the global batch is the mean of the ranks' losses over their equal shares.
    assert records[0]["loss"][0] != records[1]["loss"][0]
    for step in range(worker.STEPS):
        mean = torch.stack([r["loss"][step] for r in records]).mean()
        torch.testing.assert_close(mean, want["loss"][step], atol=atol, rtol=rtol, msg=f"loss at step {step}")
    # The steps did move the weights, so "parameters after the steps match" says something.
    start = dict(worker.make_model().named_parameters())
    assert all((want["params"][n] - start[n]).abs().max() > 1e-3 for n in names)
    return worst


def test_ddp_gloo_matches_single_process(tmp_path: Path) -> None:
    records = _launch("ddp", tmp_path)
    worst = _check_against_single_process(records, atol=1e-10, rtol=1e-10)
    print(f"DDP: largest gradient/parameter gap to one process {worst:.3e}")


def test_fsdp2_gloo_matches_single_process(tmp_path: Path) -> None:
    records = _launch("fsdp2", tmp_path)
    if any("unsupported" in r for r in records):
        reason = next(r["unsupported"] for r in records if "unsupported" in r)
        pytest.skip(f"torch {torch.__version__} cannot run FSDP2 (fully_shard) on CPU/gloo: {reason}")
    # The parameters really were sharded over the ranks: each holds about half of every weight.
    for name, p in worker.make_model().named_parameters():
        local = [r["local_shapes"][name] for r in records]
        assert sum(s[0] for s in local) == p.shape[0] and all(s[0] < p.shape[0] for s in local), (name, local)
    worst = _check_against_single_process(records, atol=1e-10, rtol=1e-10)
    print(f"FSDP2: largest gradient/parameter gap to one process {worst:.3e}")


def test_ddp_compiled_matches_single_process(tmp_path: Path) -> None:
    records = _launch("ddp_compile", tmp_path)
    assert all(r["compiled_graphs"] >= 1 for r in records)  # dynamo did compile the block
    worst = _check_against_single_process(records, atol=1e-9, rtol=1e-9)
    print(f"DDP + torch.compile: largest gradient/parameter gap to one process {worst:.3e}")
