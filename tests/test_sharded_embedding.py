"""NgramHashEmbedding with its rows sharded over a process group (docs/ngram.md#sharding), on 2 and 4 gloo ranks.

Each rank trains the sharded table on a batch of its own size (one rank's is empty among four), and
the whole table replicated under DDP on the same batches. One process, holding the whole table,
computes what DDP does: the gradient of the mean over ranks of their losses. The outputs must be
the same bits before the first step, and the gradients and tables close at every step, in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sharded_worker as worker
from dist_launch import launch
from tolerances import assert_agree

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without torch.distributed / gloo"
)


def _one_process(mode: str, world_size: int) -> dict:
    """The whole table trained on every rank's batch, the loss averaged over the ranks (DDP's gradient)."""
    table = worker.make_table(sparse=mode == "sparse_adam")
    opt = worker.optimizer(mode, table.parameters())
    record: dict = {"outputs": [], "grads": []}
    for step in range(worker.STEPS):
        opt.zero_grad(set_to_none=True)
        outs, loss = [], 0.0
        for rank in range(world_size):
            ids, target = worker.batch(rank, world_size, step)
            out = table(ids)
            outs.append(out.detach().clone())
            loss = loss + worker.loss_of(out, target)
        (loss / world_size).backward()
        grad = table.embedding.weight.grad
        record["outputs"].append(outs)
        record["grads"].append(grad.to_dense() if grad.is_sparse else grad.clone())
        opt.step()
    record["table"] = table.embedding.weight.detach().clone()
    return record


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("mode", ["train_sgd", "train_adam", "sparse_adam"])
def test_sharded_training_matches_one_process(mode: str, world_size: int, tmp_path: Path) -> None:
    records = launch("sharded_worker.py", mode, world_size, tmp_path)
    want = _one_process(mode, world_size)
    rows = want["table"].shape[0]
    assert sum(r["local_rows"] for r in records) == rows
    assert all(r["local_rows"] < rows for r in records)  # really sharded
    assert all(r["rows_as_dtensor"] for r in records), "a rank's rows are not DTensor's Shard(0) split"
    for rank, got in enumerate(records):
        # Before any step both read the same rows: the same bits.
        assert torch.equal(got["outputs"][0], want["outputs"][0][rank]), f"rank {rank}"
        for step in range(worker.STEPS):
            assert_agree(got["outputs"][step], want["outputs"][step][rank], f"rank {rank} output at step {step}")
            assert_agree(got["grads"][step], want["grads"][step], f"rank {rank} table gradient at step {step}")
        assert_agree(got["table"], want["table"], f"rank {rank} table after the steps")
        assert_agree(got["table"], got["ddp_table"], f"rank {rank} table against the replicated one under DDP")
    start = worker.make_table().embedding.weight.detach()
    moved = (want["table"] - start).abs().amax(dim=1) > 0
    assert 0 < int(moved.sum()) < rows  # the steps moved some rows and not others
    if mode == "sparse_adam":  # SparseAdam touches only the rows some rank looked up
        assert torch.equal(records[0]["table"][~moved], start[~moved])


def test_checkpoint_saved_by_two_ranks_loads_into_four_and_into_one(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    saved = launch("sharded_worker.py", "dcp_save", 2, tmp_path)[0]["table"]
    assert not torch.equal(saved, worker.make_table().embedding.weight.detach())  # trained, not the initial table
    loaded = launch("sharded_worker.py", "dcp_load", 4, tmp_path)
    for rank, record in enumerate(loaded):
        assert torch.equal(record["table"], saved), f"rank {rank} of 4"
    whole = worker.make_table(seed=worker.SEED + 2)
    state = whole.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint"))
    whole.load_state_dict(state)
    assert torch.equal(whole.embedding.weight.detach(), saved)


@pytest.mark.parametrize(
    ("mode", "rank1_says", "others_say"),
    [
        ("mismatch", "same table shape", "same table shape"),
        ("bad_ids", "expected `ids` >= 0", "ranks [1] of the process group got invalid ids"),
        ("bad_load", "of the whole table's shape", "but got [7, 3]"),
    ],
)
def test_a_bad_rank_makes_every_rank_raise(mode: str, rank1_says: str, others_say: str, tmp_path: Path) -> None:
    records = launch("sharded_worker.py", mode, 2, tmp_path)
    assert rank1_says in records[1]["error"]
    assert others_say in records[0]["error"]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL between them)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_main_job_on_two_processes_gives_the_losses_of_one(device: str, tmp_path: Path) -> None:
    """examples/train_lm.py --nproc 2: sharded tables, DDP for the rest (gloo on CPU, NCCL on GPUs)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "torch_ext")}
    args = [sys.executable, str(root / "examples" / "train_lm.py"), "--steps", "3", "--eval-every", "3", "--no-matched"]
    args += ["--device", device]
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        run = subprocess.run(
            [*args, "--nproc", str(nproc), "--threads", "1", "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["nproc"] == nproc
        losses[nproc] = summary["losses"]
    for name in ("baseline", "engram"):
        one, two = torch.tensor(losses[1][name]), torch.tensor(losses[2][name])
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5, msg=name)
