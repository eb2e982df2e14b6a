"""Launching the distributed tests' ranks, and the life of one rank, shared by their workers.

The test side: ``launch(worker, mode, world_size, tmp_path)`` starts ``python tests/WORKER MODE
STORE OUT_DIR`` once per rank (``RANK``, ``WORLD_SIZE`` in the environment, ``torch_ext`` and
``tests`` on ``PYTHONPATH``), supervises them, and returns the records they saved to
``OUT_DIR/MODE_rank{RANK}.pt``. When a rank fails or hangs, the ranks' whole logs stay in
build/test-logs/distributed/ and the failure names them.

The worker side: ``worker_main(argv, run)`` joins a gloo group through the file store, calls
``run``, saves its record, and waits for the other ranks in a monitored barrier before it closes its
connections; on an error it leaves at once. It prints time-stamped phases, and every thread's stack
on ``SIGUSR1`` (the launcher sends it to a rank that hangs).
"""

from __future__ import annotations

import faulthandler
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import pytest
import torch

# Every collective waits this long: room for a peer that compiles on a loaded 2-core machine, yet bounded.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)
# On this signal a rank prints every thread's stack to its log.
STACK_DUMP_SIGNAL = signal.SIGUSR1
# Beyond the workers' collective timeout, so a rank stuck in a collective fails with gloo's message first.
TIMEOUT_S = COLLECTIVE_TIMEOUT.total_seconds() + 120
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
        procs[rank].send_signal(STACK_DUMP_SIGNAL)
    if hung:
        time.sleep(STACK_DUMP_WAIT_S)
    for rank in hung:
        procs[rank].kill()
        procs[rank].wait()
        ended.append(f"rank {rank}: still running after {time.monotonic() - start:.1f} s; stacks dumped, killed")
    return ended, first_failed, hung


def launch(worker: str, mode: str, world_size: int, tmp_path: Path) -> list[dict]:
    """Run ``tests/WORKER MODE`` on ``world_size`` ranks; return each rank's record. A hang or a failed rank fails
    the test.

    The ranks' logs go to a fresh folder under LOG_ROOT, which a failure keeps and names.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TORCH_EXT), str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",
        PYTHONFAULTHANDLER="1",
        PYTHONUNBUFFERED="1",
    )
    LOG_ROOT.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=LOG_ROOT))
    logs = [log_dir / f"rank{r}.log" for r in range(world_size)]
    # file:// rendezvous: no port to pick; a fresh file per launch, as an old one may still hold a finished group.
    store = tmp_path / f"store-{mode}-{world_size}-{time.monotonic_ns()}"
    procs = []
    for r, log in enumerate(logs):
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(TESTS / worker), mode, str(store), str(tmp_path)],
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
    records = [tmp_path / f"{mode}_rank{r}.pt" for r in range(world_size)]
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


def say(message: str) -> None:
    """One time-stamped line in this rank's log: the phase it reached, comparable across the ranks' logs."""
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    print(f"[rank {os.environ.get('RANK', '?')} {stamp}] {message}", flush=True)


def worker_main(argv: list[str], run: Callable[[str, int, int, str], dict]) -> NoReturn:
    """A rank's life: join the group, ``record = run(mode, rank, world_size, out_dir)``, save it, leave in order."""
    import torch.distributed as dist

    mode, store, out_dir = argv
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)
    torch.set_num_threads(1)
    say(f"joining a gloo group of {world_size} through {store}")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        say(f"joined; running {mode}")
        record = run(mode, rank, world_size, out_dir)
        path = os.path.join(out_dir, f"{mode}_rank{rank}.pt")
        torch.save(record, path)
        say(f"saved {path}; waiting for the other ranks")
        # No rank closes its connections while another still needs them; a rank that never arrives is named.
        dist.monitored_barrier(timeout=COLLECTIVE_TIMEOUT, wait_all_ranks=True)
    except Exception:
        traceback.print_exc()
        # Closing the group here could wait on this rank's own pending work; the process's exit closes its
        # sockets, and a peer waiting in a collective gets "connection closed" rather than a timeout.
        say("failed: leaving without closing the process group")
        _exit(1)
    # DDP's reducer and FSDP's device mesh hold the process group, often in reference cycles: free them
    # while the interpreter is whole, so gloo's threads are not torn down during interpreter finalization.
    gc.collect()
    dist.destroy_process_group()
    say("closed the process group")
    _exit(0)


def _exit(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: the record is saved and the group closed, and the order in which it
    # tears down torch's threads is no concern of these tests.
    os._exit(code)
