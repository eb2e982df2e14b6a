"""RetrievalAttention trained under DDP and FSDP2 (docs/api.md): two gloo ranks on the CPU against one process.

Each test launches two processes of distributed_worker.py (the model, batch and training loop are
shared with the single-process reference below), each training on half of one global batch. The
gradients averaged over the ranks must equal those of one process on the whole batch, at every
step, and so must the parameters after the SGD steps. When a test fails, the ranks' whole logs
stay in build/test-logs/distributed/ and the failure names them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
from tolerances import assert_agree

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without torch.distributed / gloo"
)

WORLD_SIZE = 2
# Beyond the workers' collective timeout, so a rank stuck in a collective fails with gloo's message first.
TIMEOUT_S = worker.COLLECTIVE_TIMEOUT.total_seconds() + 120
# After one rank fails, the others get this long to exit by themselves, so their logs show how it reached them.
GRACE_S = 30
# How long a hung rank gets to print its stacks before it is killed.
STACK_DUMP_WAIT_S = 5
POLL_S = 0.05
LOG_TAIL_CHARS = 6000
TESTS = Path(__file__).resolve().parent
TORCH_EXT = TESTS.parent / "torch_ext"
# Under the repository and outside pytest's temporary directories, which later sessions delete.
LOG_ROOT = TESTS.parent / "build" / "test-logs" / "distributed"


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def _supervise(procs: list[subprocess.Popen]) -> tuple[list[str], int | None, list[int]]:
    """Wait for the ranks: how and when each ended, the first that failed, and those that hung."""
    start = time.monotonic()
    deadline = start + TIMEOUT_S
    ended: list[str] = []
    first_failed = None
    while len(ended) < len(procs) and time.monotonic() <= deadline:
        for rank, p in enumerate(procs):
            if p.returncode is None and p.poll() is not None:
                ended.append(f"rank {rank}: {_exit_status(p.returncode)} after {time.monotonic() - start:.1f} s")
                if p.returncode and first_failed is None:
                    first_failed = rank
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(POLL_S)
    hung = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for rank in hung:
        procs[rank].send_signal(worker.STACK_DUMP_SIGNAL)
    if hung:
        time.sleep(STACK_DUMP_WAIT_S)
    for rank in hung:
        procs[rank].kill()
        procs[rank].wait()
        ended.append(f"rank {rank}: still running after {time.monotonic() - start:.1f} s; stacks dumped, killed")
    return ended, first_failed, hung


def _launch(mode: str, tmp_path: Path) -> list[dict]:
    """Run MODE on WORLD_SIZE ranks; return each rank's record. A hang or a failed rank fails the test.

    The ranks' logs go to a fresh folder under LOG_ROOT, which a failure keeps and names.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TORCH_EXT), str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        WORLD_SIZE=str(WORLD_SIZE),
        OMP_NUM_THREADS="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",
        PYTHONFAULTHANDLER="1",
        PYTHONUNBUFFERED="1",
    )
    LOG_ROOT.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=LOG_ROOT))
    logs = [log_dir / f"rank{r}.log" for r in range(WORLD_SIZE)]
    store = tmp_path / "store"  # file:// rendezvous: no port to pick, nothing to collide with
    procs = []
    for r, log in enumerate(logs):
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(TESTS / "distributed_worker.py"), mode, str(store), str(tmp_path)],
                    env={**env, "RANK": str(r)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        ended, first_failed, hung = _supervise(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    records = [tmp_path / f"{mode}_rank{r}.pt" for r in range(WORLD_SIZE)]
    if first_failed is not None or hung or not all(r.exists() for r in records):
        if first_failed is not None:
            what = f"rank {first_failed} failed first" + (f", ranks {hung} were still running" if hung else "")
        elif hung:
            what = f"ranks {hung} were still running after {TIMEOUT_S:.0f} s"
        else:
            what = "a rank ended without saving its record"
        report = "\n".join(ended)
        for r, log in enumerate(logs):
            text = log.read_text(errors="replace")
            report += f"\n--- rank {r} ({_exit_status(procs[r].returncode)}), the end of {log} ---\n"
            report += text[-LOG_TAIL_CHARS:]
        pytest.fail(f"{mode}: {what}; whole logs kept in {log_dir}\n{report}", pytrace=False)
    shutil.rmtree(log_dir)
    return [torch.load(r) for r in records]


def _single_process() -> dict:
    model = worker.make_model()
    return worker.train(model, model, worker.global_batch())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _check_against_single_process(records: list[dict]) -> float:
    """Every rank's gradients at every step and parameters after the steps match one process; the worst gap.

    In float64: one process and the ranks compute the same values, summed in other orders.
    """
    want = _single_process()
    names = set(want["params"])
    worst = 0.0
    for rank, got in enumerate(records):
        assert set(got["params"]) == names, f"rank {rank}"
        for step in range(worker.STEPS):
            assert set(got["grads"][step]) == names, f"rank {rank} step {step}"
            for n in names:
                assert_agree(got["grads"][step][n], want["grads"][step][n], f"rank {rank} step {step} grad {n}")
            worst = max(worst, _max_diff(got["grads"][step], want["grads"][step]))
        for n in names:
            assert_agree(got["params"][n], want["params"][n], f"rank {rank} {n}")
        worst = max(worst, _max_diff(got["params"], want["params"]))
    # The ranks saw different data (so only the all-reduce can make their gradients agree), and the
    # loss of the global batch is the mean of the ranks' losses over their equal shares.
    assert records[0]["loss"][0] != records[1]["loss"][0]
    for step in range(worker.STEPS):
        mean = torch.stack([r["loss"][step] for r in records]).mean()
        assert_agree(mean, want["loss"][step], f"loss at step {step}")
    # The steps did move the weights, so "parameters after the steps match" says something.
    start = dict(worker.make_model().named_parameters())
    assert all((want["params"][n] - start[n]).abs().max() > 1e-3 for n in names)
    return worst


def test_ddp_gloo_matches_single_process(tmp_path: Path) -> None:
    records = _launch("ddp", tmp_path)
    worst = _check_against_single_process(records)
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
    worst = _check_against_single_process(records)
    print(f"FSDP2: largest gradient/parameter gap to one process {worst:.3e}")


def test_ddp_compiled_matches_single_process(tmp_path: Path) -> None:
    records = _launch("ddp_compile", tmp_path)
    assert all(r["compiled_graphs"] >= 1 for r in records)  # dynamo did compile the block
    worst = _check_against_single_process(records)
    print(f"DDP + torch.compile: largest gradient/parameter gap to one process {worst:.3e}")
