"""Benchmark a host-memory n-gram table's lookup, with and without prefetch (docs/ngram.md#host-tables).

``NgramHashEmbedding(host_table=True)`` keeps its table on the host; ``prefetch(ids)`` starts the
hashing and the host gather on a worker thread (and, on CUDA, the copy to the GPU on a side stream)
so that they overlap the layers before the Engram layer. A stand-in for those layers (``--matmuls``
products ``[B*T, W] @ [W, W]``) runs between the prefetch and the forward. Timed, in interleaved
rounds (forward only, no autograd):

* ``stand-in``            the stand-in alone;
* ``+ device table``      the stand-in, then the lookup in a table on the compute device (on the
                          CPU: the same memory, through the plain module);
* ``+ host table``        the stand-in, then the host table's lookup, not prefetched;
* ``+ host, prefetched``  prefetch, the stand-in, then the host table's lookup.

"hidden" is the share of the host lookup's own cost (``+ host table`` less ``stand-in``) that the
prefetch removes. On the CPU the host is the compute device: the worker thread competes with the
stand-in for the same cores, so little can be hidden where the products use every core. Results go
to stdout and ``<out>/prefetch_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_prefetch.py
    PYTHONPATH=torch_ext python benchmarks/bench_prefetch.py --device cuda --table-rows 646400 \\
        --cases 1x8192x4096x1024:bfloat16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from bench_gate import add_out_argument, interleaved_medians, keep_freed_memory
from bench_layer import NUM_HEADS, TABLE_ROWS, TOKEN_VOCAB

import retrieval_attention as ra

DEMO_TABLE_ROWS = 646400  # the demo's rows per head of each n-gram order
IMPLS = ("stand-in", "+ device table", "+ host table", "+ host, prefetched")


def bench_case(spec: str, table_rows: int, device: str, matmuls: int, min_time: float) -> dict[str, object]:
    """The case's seconds per implementation, the table's GiB and the hidden share of the host lookup."""
    shape, _, dtype_name = spec.partition(":")
    B, T, W, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "float32")
    torch.manual_seed(0)
    heads = min(NUM_HEADS, De // 2)
    kwargs = {"token_vocab_size": TOKEN_VOCAB, "device": device, "dtype": dtype}
    host = ra.NgramHashEmbedding.from_seed([table_rows, table_rows], heads, De // 2, host_table=True, **kwargs)
    if device == "cpu":  # a plain module with a tiny table, given the host table's buffers and embedding (shared)
        plain = ra.NgramHashEmbedding.from_seed([2, 2], heads, De // 2, **kwargs)
        plain.load_state_dict({k: v for k, v in host.state_dict().items() if k != "embedding.weight"}, strict=False)
        plain.embedding = host.embedding
    else:
        plain = ra.NgramHashEmbedding.from_seed([table_rows, table_rows], heads, De // 2, **kwargs)
        plain.load_state_dict(host.state_dict())
    ids = torch.randint(0, TOKEN_VOCAB, (B, T), device=device)
    x = torch.randn(B * T, W, device=device, dtype=dtype)
    weights = [torch.randn(W, W, device=device, dtype=dtype) / W**0.5 for _ in range(matmuls)]

    def standin() -> torch.Tensor:
        h = x
        for w in weights:
            h = h @ w
        return h

    def prefetched() -> object:
        host.prefetch(ids)
        standin()
        return host(ids)

    fns: dict[str, Callable[[], object]] = {
        "stand-in": standin,
        "+ device table": lambda: (standin(), plain(ids)),
        "+ host table": lambda: (standin(), host(ids)),
        "+ host, prefetched": prefetched,
    }
    with torch.no_grad():
        assert torch.equal(prefetched(), plain(ids)), "the prefetched lookup differs from the device table's"
        times = interleaved_medians(fns, min_time, device)
    lookup = times["+ host table"] - times["stand-in"]
    hidden = (times["+ host table"] - times["+ host, prefetched"]) / lookup if lookup > 0 else float("nan")
    gib = host.embedding.weight.nbytes / 2**30
    ms = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in times.items())
    print(f"  [{spec}, {table_rows} rows] {ms}, hidden {100 * hidden:.0f}%", file=sys.stderr)
    return {"case": spec, "rows": table_rows, "gib": gib, "times": times, "lookup": lookup, "hidden": hidden}


def table_row(r: dict[str, object]) -> str:
    times = r["times"]
    return (
        f"| {r['case']} | {r['rows']:,} | {r['gib']:.2f} | "
        + " | ".join(f"{times[name] * 1e3:.2f} ms" for name in IMPLS)
        + f" | {r['lookup'] * 1e3:.2f} ms | {100 * r['hidden']:.0f}% |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--cases",
        default=None,
        help="comma list of BxTxWxDe:dtype, W the stand-in's width, De the embedding size "
        "(default: 1x512x1024x1024:float32 on the CPU, the layer benchmark's; 1x8192x4096x1024:bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--table-rows",
        default=f"{TABLE_ROWS},{DEMO_TABLE_ROWS}",
        help="comma list of rows per head of each n-gram order (default: the layer benchmark's and the demo's)",
    )
    parser.add_argument(
        "--matmuls",
        type=int,
        default=None,
        help="products in the stand-in for the preceding layers (default: 1 on the CPU, 8 on CUDA, "
        "a few times the host lookup's time on each)",
    )
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per implementation")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    cases = args.cases or ("1x512x1024x1024:float32" if cpu else "1x8192x4096x1024:bfloat16")
    matmuls = args.matmuls or (1 if cpu else 8)
    if args.device == "cpu":
        keep_freed_memory()
        where = f"CPU, {torch.get_num_threads()} threads (the host is the compute device: a worker thread prefetches)"
    else:
        where = f"{torch.cuda.get_device_name()} (a worker thread and a side stream prefetch)"
    header = [
        f"# host table prefetch benchmark ({args.device})\n\n{where}; torch {torch.__version__}; "
        f"2-gram and 3-gram tables, {NUM_HEADS} heads each; stand-in: {matmuls} product(s) "
        f"[B*T, W] @ [W, W]; forward only. hidden: the share of the host lookup's cost the prefetch removes.\n",
        "| case BxTxWxDe | rows per head | table GiB | " + " | ".join(IMPLS) + " | host lookup | hidden |",
        "|---|---|---|" + "---|" * len(IMPLS) + "---|---|",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefetch_{args.device}.md"
    rows: list[str] = []
    for table_rows in (int(r) for r in args.table_rows.split(",")):
        for spec in cases.split(","):
            rows.append(table_row(bench_case(spec.strip(), table_rows, args.device, matmuls, args.min_time)))
            text = "\n".join(header + rows) + "\n"
            path.write_text(text)  # after every case: a run cut short keeps its rows
    print(text)


if __name__ == "__main__":
    main()
