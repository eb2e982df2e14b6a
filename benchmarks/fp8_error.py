"""What an FP8 n-gram table costs the Engram layer in accuracy, and what it saves in memory.

Builds the layer benchmark's layer (``NgramHashEmbedding`` then ``RetrievalAttention``, the shapes and
table sizes of benchmarks/bench_layer.py) with a bfloat16 table, converts the table to FP8 e4m3 with
UE8M0 scales per ``--block`` columns (``NgramHashEmbedding.to_fp8``, docs/ngram.md#fp8-tables) and
reports, against the bfloat16 table:

* the retrieved embeddings' and the layer output's error: max abs, max abs relative to the output's
  scale (its largest magnitude), mean abs;
* for scale, the same layer computed in float32 against the case's dtype, both on the bfloat16 table:
  the error the layer's own precision already carries;
* the memory per table row (bfloat16 against e4m3 values and scale bytes) and for the whole table;
* the lookup's median time, ``F.embedding`` of the bfloat16 table against ``fp8_lookup`` (timed in
  interleaved rounds; on a shared CPU the times are noisy).

Results go to stdout and ``<out>/fp8_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/fp8_error.py
    PYTHONPATH=torch_ext python benchmarks/fp8_error.py --device cuda --table-rows 646400
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from bench_gate import add_out_argument, interleaved_medians, keep_freed_memory
from bench_layer import NUM_HEADS, TABLE_ROWS, TOKEN_VOCAB

import retrieval_attention as ra
from retrieval_attention.fp8 import DEFAULT_BLOCK, fp8_bytes_per_row

MIB = 2**20


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, float]:
    """Max abs, max abs over the expected values' largest magnitude, and mean abs of actual - expected."""
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().max().item()
    worst = diff.max().item()
    return worst, worst / scale if scale else 0.0, diff.mean().item()


def error_case(spec: str, device: str, table_rows: int, block: int, min_time: float) -> dict[str, object]:
    """The errors, memory and lookup times of one case ``BxTxGxDxDe:dtype``."""
    shape, _, dtype_name = spec.partition(":")
    B, T, G, D, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "bfloat16")
    torch.manual_seed(0)
    block_module = ra.RetrievalAttention(D, De, G, device=device, dtype=torch.float32)
    with torch.no_grad():  # taps and norms away from their initial zeros and ones, as bench_layer does
        block_module.short_conv.weight.normal_(0, 0.2)
        for p in (block_module.gate.w_q, block_module.gate.w_k, block_module.short_conv.norm_weight):
            p.normal_(1, 0.1)
    heads = min(NUM_HEADS, De // 2)
    ngram = ra.NgramHashEmbedding.from_seed(
        [table_rows, table_rows], heads, De // 2, token_vocab_size=TOKEN_VOCAB, device=device, dtype=torch.bfloat16
    )
    fp8 = ngram.to_fp8(block, dtype=dtype)
    ids = torch.randint(0, TOKEN_VOCAB, (B, T), device=device)
    hidden = torch.randn(B, T, G, D, device=device)
    layer = block_module.to(dtype)
    with torch.no_grad():
        retrieved_bf16 = ngram(ids).to(dtype)
        retrieved_fp8 = fp8(ids)
        out_bf16 = layer(hidden.to(dtype), retrieved_bf16)
        out_fp8 = layer(hidden.to(dtype), retrieved_fp8)
        out_f32 = layer.float()(hidden, retrieved_bf16.float())
        layer.to(dtype)
        index = ngram.hash(ids) + ngram.offsets
        weight = ngram.embedding.weight.detach()
        times = interleaved_medians(
            {
                "bf16": lambda: F.embedding(index, weight),
                "fp8": lambda: ra.fp8_lookup(fp8.rows, fp8.scales, index, block=block, dtype=torch.bfloat16),
            },
            min_time,
            device,
        )
    dim = weight.shape[1]
    return {
        "case": spec,
        "retrieved": errors(retrieved_fp8, retrieved_bf16),
        "layer": errors(out_fp8, out_bf16),
        "layer_precision": errors(out_bf16, out_f32),
        "dim": dim,
        "rows": weight.shape[0],
        "bf16_row": dim * weight.element_size(),
        "fp8_row": fp8_bytes_per_row(dim, block),
        "lookups": index.numel(),
        "times": times,
    }


def table_rows_md(r: dict[str, object]) -> list[str]:
    def row(what: str, e: tuple[float, float, float]) -> str:
        return f"| {r['case']} | {what} | {e[0]:.3g} | {e[1]:.3g} | {e[2]:.3g} |"

    return [
        row("retrieved embeddings: fp8 against the bf16 table", r["retrieved"]),
        row("layer output: fp8 against the bf16 table", r["layer"]),
        row("layer output: this dtype against float32 (bf16 table; for scale)", r["layer_precision"]),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default="1x512x4x1024x1024:bfloat16,1x512x4x1024x1024:float32",
        help="comma list of BxTxGxDxDe:dtype, the layer's dtype (default: the layer benchmark's shapes)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--table-rows", type=int, default=TABLE_ROWS, help="rows per head of each n-gram order")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="columns per scale")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of lookup timing per implementation")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
        threads = torch.get_num_threads()
        where = f"CPU, {threads} thread{'s' if threads > 1 else ''} (shared with other work: times are noisy)"
    else:
        where = torch.cuda.get_device_name()
    records = [
        error_case(spec.strip(), args.device, args.table_rows, args.block, args.min_time)
        for spec in args.cases.split(",")
    ]
    first = records[0]
    lines = [
        f"# FP8 table error ({args.device})\n",
        f"{where}; torch {torch.__version__}. The layer benchmark's layer: 2-gram and 3-gram tables, "
        f"{NUM_HEADS} heads of {args.table_rows} rows (the next primes) each, rows of {first['dim']} columns; "
        f"the bfloat16 table N(0, 1) converted to float8_e4m3fn with one UE8M0 scale per {args.block} columns.\n",
        "| case BxTxGxDxDe:dtype | compared | max abs | max abs / output scale | mean abs |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines += table_rows_md(r)
    rows = first["rows"]
    lines += [
        "",
        "| table | bytes per row | whole table (MiB) |",
        "|---|---|---|",
        f"| bfloat16 | {first['bf16_row']} | {rows * first['bf16_row'] / MIB:.1f} |",
        f"| float8_e4m3fn + UE8M0 scales | {first['fp8_row']} ({first['dim']} + {first['fp8_row'] - first['dim']}) "
        f"| {rows * first['fp8_row'] / MIB:.1f} |",
        "",
        "| case | lookups | F.embedding, bf16 table (ms) | fp8_lookup to bf16 (ms) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['lookups']} | {r['times']['bf16'] * 1e3:.3f} | {r['times']['fp8'] * 1e3:.3f} |"
        for r in records
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fp8_{args.device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
