"""One rank of test_sharded_embedding.py, and the table, batches and training loop it shares with the tests.

Run as ``python tests/sharded_worker.py MODE STORE OUT_DIR`` (dist_launch.launch does). MODE:

* ``train_sgd``, ``train_adam``: the sharded table trains ``STEPS`` steps on the rank's batch;
  the record holds the rank's outputs, the whole table's gradient and the whole table after the steps;
* ``sparse_adam``: the same with ``sparse=True`` and ``SparseAdam``;
* ``dcp_save``: a trained table saved with ``torch.distributed.checkpoint`` to ``OUT_DIR/checkpoint``;
* ``dcp_load``: a table of other weights loads that checkpoint;
* ``mismatch``: rank 1 builds a table of another size; ``bad_ids``: rank 1 passes a negative id;
  ``bad_load``: a state dict whose table has another shape. Every rank must raise; the record
  holds its message.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from retrieval_attention import NgramHashEmbedding

from dist_launch import worker_main

VOCAB = 50
TABLE_SIZES = [23, 29]  # per head, of the 2-gram and 3-gram orders: primes from there
HEADS, EMBED_PER_NGRAM, T = 2, 6, 9
# Uneven batches, one of them empty where there are four ranks.
BATCH_SIZES = {1: [3], 2: [3, 1], 4: [2, 0, 3, 1]}
STEPS = 3
LR = {"train_sgd": 0.5, "train_adam": 0.05, "sparse_adam": 0.05}
SEED = 99


def make_table(process_group: dist.ProcessGroup | None = None, *, sparse: bool = False, seed: int = SEED, sizes=None):
    """The same float64 table in every process (built whole, then loaded: each rank keeps its rows)."""
    torch.manual_seed(seed)
    kwargs = {"token_vocab_size": VOCAB, "sparse": sparse, "dtype": torch.float64}
    whole = NgramHashEmbedding.from_seed(sizes or TABLE_SIZES, HEADS, EMBED_PER_NGRAM, **kwargs)
    if process_group is None:
        return whole
    table = NgramHashEmbedding.from_seed(
        sizes or TABLE_SIZES, HEADS, EMBED_PER_NGRAM, process_group=process_group, **kwargs
    )
    table.load_state_dict(whole.state_dict())
    return table


def batch(rank: int, world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ids [B_r, T] (a skewed draw: rows repeat, within and across ranks) and target at ``step``."""
    gen = torch.Generator().manual_seed(SEED + 1000 * step + rank)
    b = BATCH_SIZES[world_size][rank]
    ids = (torch.rand(b, T, generator=gen).square() * VOCAB).long()
    target = torch.randn(b, T, 2 * EMBED_PER_NGRAM, generator=gen, dtype=torch.float64)
    return ids, target


def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # A sum (an empty batch gives 0, not nan); averaging over ranks is the exchange's, as DDP's.
    return (out - target).square().sum() / 10


def optimizer(mode: str, params) -> torch.optim.Optimizer:
    cls = {"train_sgd": torch.optim.SGD, "train_adam": torch.optim.Adam, "sparse_adam": torch.optim.SparseAdam}[mode]
    return cls(list(params), lr=LR[mode])


def train(mode: str, rank: int, world_size: int) -> tuple[dict, NgramHashEmbedding]:
    from torch.distributed.tensor import Shard, distribute_tensor

    table = make_table(dist.group.WORLD, sparse=mode == "sparse_adam")
    mesh = table.sharded_weight().device_mesh
    # This rank's rows are the ones DTensor's own Shard(0) gives it.
    dtensor_rows = distribute_tensor(make_table().embedding.weight.detach(), mesh, [Shard(0)]).to_local()
    opt = optimizer(mode, table.parameters())
    record: dict = {
        "outputs": [],
        "grads": [],
        "local_rows": table.embedding.weight.shape[0],
        "rows_as_dtensor": torch.equal(dtensor_rows, table.embedding.weight.detach()),
    }
    for step in range(STEPS):
        ids, target = batch(rank, world_size, step)
        opt.zero_grad(set_to_none=True)
        out = table(ids)
        loss_of(out, target).backward()
        grad = table.embedding.weight.grad
        record["outputs"].append(out.detach().clone())
        record["grads"].append(whole_of(table, grad.to_dense() if grad.is_sparse else grad))
        opt.step()
    record["table"] = table.sharded_weight().full_tensor()
    record["ddp_table"] = train_replicated_under_ddp(mode, rank, world_size)
    return record, table


def train_replicated_under_ddp(mode: str, rank: int, world_size: int) -> torch.Tensor:
    """The whole table on every rank under DDP, trained on the same batches: the table after the steps."""
    from torch.nn.parallel import DistributedDataParallel

    table = make_table(sparse=mode == "sparse_adam")
    ddp = DistributedDataParallel(table)
    opt = optimizer(mode, table.parameters())
    for step in range(STEPS):
        ids, target = batch(rank, world_size, step)
        opt.zero_grad(set_to_none=True)
        loss_of(ddp(ids), target).backward()
        opt.step()
    return table.embedding.weight.detach().clone()


def whole_of(table: NgramHashEmbedding, local: torch.Tensor) -> torch.Tensor:
    """The whole table's tensor from every rank's block of rows."""
    from torch.distributed.tensor import DTensor

    sharded = table.sharded_weight()
    return DTensor.from_local(
        local.detach(),
        sharded.device_mesh,
        sharded.placements,
        run_check=False,
        shape=sharded.shape,
        stride=sharded.stride(),
    ).full_tensor()


def run(mode: str, rank: int, world_size: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp

    checkpoint = os.path.join(out_dir, "checkpoint")
    if mode in LR:
        return train(mode, rank, world_size)[0]
    if mode == "dcp_save":
        record, table = train("train_sgd", rank, world_size)
        dcp.save(table.state_dict(), checkpoint_id=checkpoint)
        return {"table": record["table"]}
    if mode == "dcp_load":
        table = make_table(dist.group.WORLD, seed=SEED + 1)
        state = table.state_dict()
        dcp.load(state, checkpoint_id=checkpoint)
        table.load_state_dict(state)
        return {"table": table.sharded_weight().full_tensor(), "local_rows": table.embedding.weight.shape[0]}
    if mode == "bad_load":
        table = make_table(dist.group.WORLD)
        try:
            table.load_state_dict({**table.state_dict(), "embedding.weight": torch.zeros(7, 3, dtype=torch.float64)})
        except ValueError as error:
            return {"error": str(error)}
        return {"error": None}
    if mode in ("mismatch", "bad_ids"):
        try:
            sizes = [31, 29] if mode == "mismatch" and rank == 1 else None
            table = make_table(dist.group.WORLD, sizes=sizes)
            ids, _ = batch(rank, world_size, 0)
            if rank == 1:
                ids[0, 0] = -3
            table(ids)
        except ValueError as error:
            return {"error": str(error)}
        return {"error": None}
    raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    worker_main(sys.argv[1:], run)
