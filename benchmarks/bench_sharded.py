"""Benchmark the row-sharded n-gram table (docs/ngram.md#sharding): bytes exchanged, lookup time, memory per rank.

The table is the main job's (``examples/train_lm.py``: byte tokens, 2- and 3-gram tables of
5,000 and 30,000 rows per head, 4 heads, 64 columns per order, sparse gradients; ``--table-scale`` multiplies the
rows), the batches are windows of its corpus (Python's own documentation), one global batch
split over the ranks. For 1, 2 and 4 gloo processes on this machine it reports, per step:

* the bytes each rank sends to the others (row ids out, rows back, and in the backward the rows'
  gradients), with the ids de-duplicated as the module does and without (every token's row ids);
* the time of a lookup and its backward (the median over steps of the slowest rank), against the
  unsharded module in one process on the whole batch;
* the table's bytes per rank, and each rank's peak resident memory.

Results go to stdout and ``<out>/sharded_cpu.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_sharded.py
    PYTHONPATH=torch_ext python benchmarks/bench_sharded.py --ranks 1,2 --steps 5 --batch 8
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_gate import add_out_argument

from retrieval_attention import NgramHashEmbedding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from train_lm import VOCAB, Config, load_corpus  # noqa: E402

WARMUP = 2


def make_table(cfg: Config, scale: float, group: dist.ProcessGroup | None) -> NgramHashEmbedding:
    sizes = [max(2, int(v * scale)) for v in cfg.ngram_vocab]
    return NgramHashEmbedding.from_seed(
        sizes,
        cfg.ngram_heads,
        cfg.ngram_dim,
        token_vocab_size=VOCAB,
        seed=0,
        layer_id=1,
        sparse=True,  # as the main job's
        process_group=group,
    )


def global_batches(cfg: Config, batch: int, steps: int) -> list[torch.Tensor]:
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - cfg.seq, (steps + WARMUP, batch), generator=gen)
    return [torch.stack([data[s : s + cfg.seq] for s in row.tolist()]) for row in starts]


def exchanged_bytes(table: NgramHashEmbedding, ids: torch.Tensor, dedup: bool) -> int:
    """Bytes this rank sends to other ranks in one step: ids out, rows back to their askers, gradients home."""
    sh = table.sharding
    rows = (table.hash(ids) + table.offsets).flatten()
    asked = torch.unique(rows) if dedup else rows
    off_rank = int((sh.owners(asked) != sh.rank).sum())
    row_bytes = table.embedding.weight.shape[1] * table.embedding.weight.element_size()
    # Each off-rank id crosses once (8 bytes), its row comes back once, and its gradient goes home once;
    # by symmetry of the exchange, what a rank receives in rows it sends as gradients.
    return off_rank * (8 + 2 * row_bytes)


def step_time(table: NgramHashEmbedding, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    out = table(ids)
    out.backward(torch.ones_like(out))
    table.embedding.weight.grad = None
    return time.perf_counter() - start


def rank_main(rank: int, world_size: int, store: str, cfg: Config, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    table = make_table(cfg, args.table_scale, dist.group.WORLD)
    times, dedup, plain = [], [], []
    for step, ids in enumerate(global_batches(cfg, args.batch, args.steps)):
        mine = ids.tensor_split(world_size)[rank]
        seconds = torch.tensor(step_time(table, mine), dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        if step >= WARMUP:
            times.append(seconds.item())
            dedup.append(exchanged_bytes(table, mine, dedup=True))
            plain.append(exchanged_bytes(table, mine, dedup=False))
    stats = {
        "time": statistics.median(times),
        "dedup": statistics.mean(dedup),
        "plain": statistics.mean(plain),
        "table_bytes": table.embedding.weight.numel() * table.embedding.weight.element_size(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        results.put(gathered)
    dist.barrier()
    dist.destroy_process_group()


def run_sharded(world_size: int, cfg: Config, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            rank_main,
            args=(world_size, os.path.join(tmp, "store"), cfg, args, results),
            nprocs=world_size,
            start_method="spawn",
        )
    return results.get(timeout=10)


def run_unsharded(cfg: Config, args: argparse.Namespace) -> float:
    table = make_table(cfg, args.table_scale, None)
    times = [step_time(table, ids) for ids in global_batches(cfg, args.batch, args.steps)]
    return statistics.median(times[WARMUP:])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma list of process counts")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences of the main job's length)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--table-scale", type=float, default=1.0, help="multiplies the main job's table rows")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    cfg = Config()
    torch.set_num_threads(1)
    unsharded = run_unsharded(cfg, args)
    lines = [
        "# sharded n-gram table (cpu, gloo)\n",
        f"{os.cpu_count()} CPU cores; torch {torch.__version__}; the main job's table x {args.table_scale:g}; "
        f"global batch {args.batch} x {cfg.seq} tokens; one thread per process; median of {args.steps} steps.\n"
        f"Unsharded module, one process: lookup + backward {unsharded * 1e3:.2f} ms per step.\n",
        "| ranks | bytes sent per rank per step: de-duplicated / every id | saving | lookup + backward per step "
        "| / unsharded | table MiB per rank | peak RSS MiB per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for world_size in (int(w) for w in args.ranks.split(",")):
        stats = run_sharded(world_size, cfg, args)
        dedup = statistics.mean(s["dedup"] for s in stats)
        plain = statistics.mean(s["plain"] for s in stats)
        table_mib = max(s["table_bytes"] for s in stats) / 2**20
        rss_mib = max(s["peak_rss"] for s in stats) / 2**20
        saving = f"{plain / dedup:.1f}x" if dedup else "n/a"
        seconds = stats[0]["time"]
        lines.append(
            f"| {world_size} | {dedup / 1024:.1f} KiB / {plain / 1024:.1f} KiB | {saving} | {seconds * 1e3:.2f} ms "
            f"| {seconds / unsharded:.2f} | {table_mib:.1f} | {rss_mib:.0f} |"
        )
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
