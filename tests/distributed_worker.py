"""One rank of the distributed tests in test_distributed.py, and the model and batch they share.

Run as ``python tests/distributed_worker.py MODE STORE OUT_DIR`` with ``RANK`` and ``WORLD_SIZE``
in the environment (``torch_ext`` and ``tests`` on ``PYTHONPATH``). MODE is ``ddp``,
``ddp_compile`` (the block under ``torch.compile(fullgraph=True)`` inside DDP) or ``fsdp2``.
The rank joins a gloo process group through the file store STORE, trains its share of the
global batch for ``STEPS`` SGD steps and saves what it saw to ``OUT_DIR/MODE_rank{RANK}.pt``:
the loss and the full gradient of every parameter at each step, and the full parameters after
the last step.

A rank's life (the group, the record, the orderly exit) is dist_launch.worker_main's.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from retrieval_attention import RetrievalAttention

from dist_launch import worker_main

# G = 3 makes the [G, D] weights shard unevenly over two FSDP ranks.
G, D, DE, B, T = 3, 16, 12, 4, 11
STEPS = 3
LR = 0.1
SEED = 1234


def make_model(dtype: torch.dtype = torch.float64) -> RetrievalAttention:
    """The block with the same weights in every process; norms and taps randomized so each one matters."""
    torch.manual_seed(SEED)
    model = RetrievalAttention(D, DE, G, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "w_" in name:
                p.normal_(1.0, 0.3)
            elif "short_conv" in name:  # the taps start at zero: give their gradient path something to do
                p.normal_(0.0, 0.3)
    return model


def global_batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden`` [B, T, G, D], ``retrieved`` [B, T, D_e] and a regression target [B, T, G, D]."""
    gen = torch.Generator().manual_seed(SEED + 1)
    hidden = torch.randn(B, T, G, D, generator=gen, dtype=dtype)
    retrieved = torch.randn(B, T, DE, generator=gen, dtype=dtype)
    target = torch.randn(B, T, G, D, generator=gen, dtype=dtype)
    return hidden, retrieved, target


def shard(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """The rank's equal, contiguous share of the batch dimension."""
    return tuple(x.chunk(world_size)[rank] for x in batch)


def train(
    forward: nn.Module | Callable[..., torch.Tensor],
    params: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    full: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict:
    """``STEPS`` SGD steps on the mean squared error; ``full`` turns a (sharded) tensor into a plain one.

    The loss is a mean over the rank's rows, so the gradient averaged over equal shares (what DDP
    and FSDP compute) is the gradient of the mean over the global batch.
    """
    hidden, retrieved, target = batch
    opt = torch.optim.SGD(params.parameters(), lr=LR)
    record: dict = {"loss": [], "grads": []}
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = (forward(hidden, retrieved) - target).square().mean()
        loss.backward()
        record["loss"].append(loss.detach().clone())
        record["grads"].append({n: full(p.grad).detach().clone() for n, p in params.named_parameters()})
        opt.step()
    record["params"] = {n: full(p).detach().clone() for n, p in params.named_parameters()}
    return record


def _fsdp2_unsupported(world_size: int) -> str | None:
    """Why FSDP2 cannot train even a plain nn.Linear in this process group, or None when it can."""
    import torch.distributed as dist

    reason = None
    try:
        from torch.distributed.fsdp import fully_shard

        probe = nn.Linear(4, 4, dtype=torch.float64)
        fully_shard(probe)
        probe(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
        probe.weight.grad.full_tensor()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    # A probe that failed on some ranks only (a timeout, a lost peer) is an error, not a reason to skip;
    # a failure that broke the process group makes this all-gather raise.
    reasons: list[str | None] = [None] * world_size
    dist.all_gather_object(reasons, reason)
    failed = [r for r, why in enumerate(reasons) if why is not None]
    if 0 < len(failed) < world_size:
        raise RuntimeError(f"the FSDP2 probe failed on ranks {failed} only: {reasons}")
    return reason


def run(mode: str, rank: int, world_size: int, out_dir: str) -> dict:
    model = make_model()
    batch = shard(global_batch(), rank, world_size)
    if mode in ("ddp", "ddp_compile"):
        from torch._dynamo.utils import counters
        from torch.nn.parallel import DistributedDataParallel

        # A small bucket cap splits the gradients over several all-reduces.
        if mode == "ddp":
            return train(DistributedDataParallel(model, bucket_cap_mb=0.002), model, batch)
        # The block compiled whole (fullgraph: any graph break raises), its backward feeding DDP's hooks;
        # default buckets, as dynamo's DDPOptimizer wants the first bucket no larger than the others.
        ddp = DistributedDataParallel(torch.compile(model, fullgraph=True))
        record = train(ddp, model, batch)
        record["compiled_graphs"] = counters["stats"]["unique_graphs"]
        return record
    if mode == "fsdp2":
        reason = _fsdp2_unsupported(world_size)
        if reason is not None:
            return {"unsupported": reason}
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        # kv_proj in a group of its own, as a model would shard its layers. FSDP2 warns that it returns a
        # view (in-place ops on one would skip its backward hook); the block only slices it, out of place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        fully_shard(model.kv_proj)
        fully_shard(model)
        sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
        if len(sharded) != len(list(model.parameters())):
            raise AssertionError(f"fully_shard left plain parameters: only {sharded} are DTensors")
        record = train(model, model, batch, full=lambda t: t.full_tensor())
        record["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        return record
    raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    worker_main(sys.argv[1:], run)
