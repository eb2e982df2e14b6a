"""RetrievalAttention trained under DDP and FSDP2 (docs/api.md): two gloo ranks on the CPU against one process.

Each test launches two processes of distributed_worker.py (dist_launch.launch) (the model, batch and training loop are
shared with the single-process reference below), each training on half of one global batch. The
gradients averaged over the ranks must equal those of one process on the whole batch, at every
step, and so must the parameters after the SGD steps. When a test fails, the ranks' whole logs
stay in build/test-logs/distributed/ and the failure names them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
from dist_launch import launch
from tolerances import assert_agree

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without torch.distributed / gloo"
)

WORLD_SIZE = 2


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
    records = launch("distributed_worker.py", "ddp", WORLD_SIZE, tmp_path)
    worst = _check_against_single_process(records)
    print(f"DDP: largest gradient/parameter gap to one process {worst:.3e}")


def test_fsdp2_gloo_matches_single_process(tmp_path: Path) -> None:
    records = launch("distributed_worker.py", "fsdp2", WORLD_SIZE, tmp_path)
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
    records = launch("distributed_worker.py", "ddp_compile", WORLD_SIZE, tmp_path)
    assert all(r["compiled_graphs"] >= 1 for r in records)  # dynamo did compile the block
    worst = _check_against_single_process(records)
    print(f"DDP + torch.compile: largest gradient/parameter gap to one process {worst:.3e}")
