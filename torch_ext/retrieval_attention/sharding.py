"""Row sharding of ``NgramHashEmbedding``'s table over a process group (docs/ngram.md#sharding).

Rank ``r`` of ``W`` owns rows ``[r * block, (r + 1) * block)`` of the concatenated table (clipped to
its size), ``block = ceil(rows / W)``: the split of DTensor's ``Shard(0)``. A lookup de-duplicates
its row ids, sends each to its owner with ``all_to_all_single``, and receives the rows back; the
backward sends each unique row's gradient to its owner, which sums what it receives in rank order
and divides by ``W``, as DDP averages a replicated table's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Columns of the plan message each rank sends every other: how many row ids follow, and whether its ids are bad.
_COUNT, _BAD = 0, 1


@dataclass(frozen=True)
class RowSharding:
    """Which rows of a ``rows``-row table each rank of ``group`` owns."""

    group: dist.ProcessGroup
    world_size: int
    rank: int
    rows: int
    block: int

    def owned(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of ``rank``'s rows."""
        start = min(rank * self.block, self.rows)
        return start, min(start + self.block, self.rows)

    @property
    def start(self) -> int:
        return self.owned(self.rank)[0]

    @property
    def local_rows(self) -> int:
        start, end = self.owned(self.rank)
        return end - start

    def owners(self, rows: torch.Tensor) -> torch.Tensor:
        """The rank that owns each global row id."""
        return torch.div(rows, self.block, rounding_mode="floor")


def row_sharding(rows: int, group: dist.ProcessGroup) -> RowSharding:
    world_size = dist.get_world_size(group)
    return RowSharding(group, world_size, dist.get_rank(group), rows, max(1, -(-rows // world_size)))


def agree(sharding: RowSharding, facts: dict[str, object], what: str) -> None:
    """Raise on every rank, naming the ranks and the fact, unless every rank has the same ``facts``."""
    gathered: list[dict[str, object] | None] = [None] * sharding.world_size
    dist.all_gather_object(gathered, facts, group=sharding.group)
    for name, mine in gathered[0].items():
        differ = [r for r, theirs in enumerate(gathered) if theirs[name] != mine]
        if differ:
            raise ValueError(
                f"{what}: every rank of the process group must have the same {name}, but ranks {differ} differ "
                f"from rank 0 ({gathered[differ[0]][name]!r} against {mine!r})"
            )


@dataclass
class _Plan:
    """One lookup's exchange: where each token's row is among the unique ones, the rows asked of this rank,
    and the splits."""

    inverse: torch.Tensor  # [M] index into the unique ids
    unique_count: int
    requested: torch.Tensor  # [sum(recv_counts)] local row ids other ranks asked this rank for, in rank order
    send_counts: list[int]
    recv_counts: list[int]


def _exchange(
    t: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    out = t.new_empty((sum(recv_counts), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=group)
    return out


def plan_lookup(rows: torch.Tensor, sharding: RowSharding, error: str | None) -> _Plan:
    """De-duplicate ``rows`` (global ids, [M]) and agree on the splits; raise on every rank if any had an error.

    ``error`` is this rank's own complaint about its input (then ``rows`` is ignored): the ranks
    learn of it in the same message as the counts, so a bad input on one rank cannot hang the others.
    """
    W = sharding.world_size
    if error is not None:
        rows = rows.new_empty(0)
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    owners = sharding.owners(unique)
    message = torch.zeros(W, 2, dtype=torch.int64, device=rows.device)
    message[:, _COUNT] = torch.bincount(owners, minlength=W)
    message[:, _BAD] = int(error is not None)
    received = torch.empty_like(message)
    dist.all_to_all_single(received, message, group=sharding.group)
    received = received.cpu()
    if error is not None:
        raise ValueError(error)
    bad = [r for r in range(W) if received[r, _BAD]]
    if bad:
        raise ValueError(f"NgramHashEmbedding: ranks {bad} of the process group got invalid ids (see their errors)")
    send_counts = message[:, _COUNT].tolist()
    recv_counts = received[:, _COUNT].tolist()
    requested = _exchange(unique, send_counts, recv_counts, sharding.group) - sharding.start
    return _Plan(inverse.flatten(), unique.shape[0], requested, send_counts, recv_counts)


class ShardedLookup(torch.autograd.Function):
    """``weight`` (this rank's rows) and a plan -> the planned rows ``[M, dim]``; the backward sends gradients home."""

    @staticmethod
    def forward(weight: torch.Tensor, plan: _Plan, sharding: RowSharding, sparse: bool) -> torch.Tensor:
        found = _exchange(weight.index_select(0, plan.requested), plan.recv_counts, plan.send_counts, sharding.group)
        return found.index_select(0, plan.inverse)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, ctx.plan, ctx.sharding, ctx.sparse = inputs
        ctx.weight_shape = weight.shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        plan, sharding = ctx.plan, ctx.sharding
        per_row = grad.new_zeros(plan.unique_count, grad.shape[-1]).index_add_(0, plan.inverse, grad)
        received = _exchange(per_row, plan.send_counts, plan.recv_counts, sharding.group)
        received.div_(sharding.world_size)  # the average over ranks, as DDP's
        if ctx.sparse:
            return torch.sparse_coo_tensor(plan.requested[None], received, ctx.weight_shape), None, None, None
        # index_add_ adds in the order received: by source rank, then by row id.
        return grad.new_zeros(ctx.weight_shape).index_add_(0, plan.requested, received), None, None, None
