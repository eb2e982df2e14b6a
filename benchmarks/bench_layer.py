"""Benchmark the Engram layer as users run it, against the official Engram demo's math.

Four implementations of the layer (n-gram hashing, table lookup, projection, gate, short
convolution; docs/ngram.md and docs/block.md), side by side:

* ``demo``      the demo's ``Engram`` forward rebuilt in plain PyTorch from its published math: the
                multiply-XOR hashing (``reference.ngram_hash``), one table with per-head offsets, a
                value projection and one key projection per branch, per-branch RMSNorms, the signed
                square root gate, then ``o + ShortConv(o)`` in eager ops;
* ``compiled``  ``torch.compile`` of that after the hashing (the demo hashes in NumPy, outside its graph);
* ``ours``      ``NgramHashEmbedding`` then ``RetrievalAttention``: the hashing operator, the
                projection operator (float32 on the CPU: oneDNN's product), the fused gate and the
                fused short convolution;
* ``ours_aten`` the same with the projection in PyTorch's own product (MKL on the CPU), to show
                what the other kernels gain apart from the GEMM.

All share one set of parameters, the table included (dense gradients, as the demo's
``nn.Embedding``). For each case it reports the median time of the forward, of the backward alone
(gradients of the hidden state and of every parameter, the graph kept) and of forward+backward,
the speedups, the share of ours spent in the projection's matrix products (profiler), and the
activations each keeps for its backward (saved tensors other than parameters and inputs). Results
go to stdout and ``<out>/layer_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_layer.py
    PYTHONPATH=torch_ext python benchmarks/bench_layer.py --cases 1x512x4x1024x1024:float32 --min-time 0.5
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gate import add_out_argument, interleaved_medians, keep_freed_memory

import retrieval_attention as ra
from retrieval_attention import _linear as ra_linear
from retrieval_attention import reference
from retrieval_attention._inductor_cache import isolate_inductor_cache

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")
IMPLS = ("demo", "compiled", "ours", "ours_aten")
IMPL_LABELS = {
    "demo": "demo (eager)",
    "compiled": "torch.compile(demo)",
    "ours": "ours",
    "ours_aten": "ours, ATen's GEMM",
}
PHASES = ("fwd", "bwd", "fwd+bwd")
NUM_HEADS = 8  # hash heads per n-gram order, as the demo
TOKEN_VOCAB = 129280  # the demo's tokenizer
TABLE_ROWS = 12928  # per head of each n-gram order: a fiftieth of the demo's 646,400, for a 2-core CPU


def demo_block(
    hidden: torch.Tensor, retrieved: torch.Tensor, params: dict[str, torch.Tensor], eps: float
) -> torch.Tensor:
    """The demo's Engram block: per-branch projections and norms, the gate, o + ShortConv(o)."""
    G, D = hidden.shape[-2:]
    v = F.linear(retrieved, params["w_v"], params["b_v"])
    outs = []
    for g in range(G):
        key = F.linear(retrieved, params["w_k"][g], params["b_k"][g])
        k = F.rms_norm(key, (D,), params["norm_k"][g], eps)
        q = F.rms_norm(hidden[:, :, g], (D,), params["norm_q"][g], eps)
        s = (k * q).sum(dim=-1) / math.sqrt(D)
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        outs.append(s.sigmoid().unsqueeze(-1) * v)
    o = torch.stack(outs, dim=2)
    return o + ra.reference.short_conv(o, params["conv"], params["conv_norm"], dilation=3, eps=1e-5)


def aten_gemm(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with the block's projection in PyTorch's own product (MKL on the CPU) instead of the
    linear operator's oneDNN: what the block's other kernels gain, apart from the GEMM."""
    ra_linear.use_operator = False
    try:
        return fn()
    finally:
        ra_linear.use_operator = True


def demo_params(block: ra.RetrievalAttention) -> dict[str, torch.Tensor]:
    """The block's parameters in the demo's layout, as leaves of their own."""
    G, D = block.num_branches, block.hidden_size
    w, b = block.kv_proj.weight.detach(), block.kv_proj.bias.detach()
    params = {
        "w_v": w[:D],
        "b_v": b[:D],
        "w_k": w[D:].unflatten(0, (G, D)),
        "b_k": b[D:].unflatten(0, (G, D)),
        "norm_k": block.gate.w_k.detach(),
        "norm_q": block.gate.w_q.detach(),
        "conv": block.short_conv.weight.detach(),
        "conv_norm": block.short_conv.norm_weight.detach(),
    }
    return {name: t.clone().requires_grad_() for name, t in params.items()}


def saved_mib(step: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor]) -> float:
    """MiB of the tensors autograd saves for the backward, other than the parameters and inputs."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def demo_hash(ids: torch.Tensor, ngram: ra.NgramHashEmbedding) -> torch.Tensor:
    """The demo's hashing (its NumPy math in torch ops), eager in every variant: the demo hashes with NumPy,
    outside any graph torch.compile could capture."""
    return reference.ngram_hash(ids, ngram.multipliers, ngram.primes, pad_id=ngram.hash_pad_id)


def demo_layer(
    hashes: torch.Tensor, hidden: torch.Tensor, params: dict[str, torch.Tensor], offsets: torch.Tensor, eps: float
) -> torch.Tensor:
    """The demo's Engram layer after the hashing: look up (offsets per head), then the block."""
    retrieved = F.embedding(hashes + offsets, params["table"]).flatten(-2)
    return demo_block(hidden, retrieved, params, eps)


def profile_share(step: Callable[[], object], device: str) -> float:
    """Fraction of one step's operator time spent in matrix products (profiler; kernel time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device == "cuda":
        total = sum(e.self_device_time_total for e in events)
        gemm = sum(e.device_time_total for e in events if e.key in GEMM_OPS)
    else:
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    return gemm / total if total else 0.0


def bench_case(spec: str, device: str, min_time: float, table_rows: int) -> list[dict[str, object]]:
    """One record per phase: the case, each implementation's seconds, ours' GEMM share, and the saved MiB."""
    shape, _, dtype_name = spec.partition(":")
    B, T, G, D, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "float32")
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    block = ra.RetrievalAttention(D, De, G, **factory)
    with torch.no_grad():  # taps and norms away from their initial zeros and ones
        block.short_conv.weight.normal_(0, 0.2)
        for p in (block.gate.w_q, block.gate.w_k, block.short_conv.norm_weight):
            p.normal_(1, 0.1)
    heads = min(NUM_HEADS, De // 2)
    ngram = ra.NgramHashEmbedding.from_seed(
        [table_rows, table_rows], heads, De // 2, token_vocab_size=TOKEN_VOCAB, **factory
    )
    ids = torch.randint(0, TOKEN_VOCAB, (B, T), device=device)
    hidden = torch.randn(B, T, G, D, requires_grad=True, **factory)
    params = demo_params(block)
    params["table"] = ngram.embedding.weight.detach().clone().requires_grad_()
    eps = torch.finfo(dtype).eps
    compiled = torch.compile(demo_layer, dynamic=False)
    ours_params = [*ngram.parameters(), *block.parameters()]
    leaves = {
        "demo": [hidden, *params.values()],
        "compiled": [hidden, *params.values()],
        "ours": [hidden, *ours_params],
        "ours_aten": [hidden, *ours_params],
    }
    forward = {
        "demo": lambda: demo_layer(demo_hash(ids, ngram), hidden, params, ngram.offsets, eps),
        "compiled": lambda: compiled(demo_hash(ids, ngram), hidden, params, ngram.offsets, eps),
        "ours": lambda: block(hidden, ngram(ids)),
        "ours_aten": lambda: aten_gemm(lambda: block(hidden, ngram(ids))),
    }
    y = forward["ours"]().detach()
    # The same layer: the demo's eager ops round at every op, so bfloat16 agrees only to its own precision.
    tol = 1e-3 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(forward["demo"]().detach(), y, rtol=tol, atol=tol)
    grad_y = torch.randn_like(y)
    steps: dict[str, dict[str, Callable[[], object]]] = {}
    outs = {}
    for name in IMPLS:
        fwd = forward[name]
        outs[name] = fwd()

        def bwd(out=outs[name], name=name) -> object:
            return torch.autograd.grad(out, leaves[name], grad_y, retain_graph=True)

        def fwd_bwd(fwd=fwd, name=name) -> object:
            return torch.autograd.grad(fwd(), leaves[name], grad_y)

        steps[name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    # The three in turn, call by call: the machine's drift then slows all of them alike.
    times = {name: {} for name in IMPLS}
    for phase in PHASES:
        medians = interleaved_medians({name: steps[name][phase] for name in IMPLS}, min_time, device)
        for name in IMPLS:
            times[name][phase] = medians[name]
    share = {phase: profile_share(step, device) for phase, step in steps["ours"].items()}
    outs.clear()
    saved = {name: saved_mib(forward[name], leaves[name]) for name in IMPLS}
    for name in IMPLS:
        ms = ", ".join(f"{phase} {seconds * 1e3:.2f} ms" for phase, seconds in times[name].items())
        print(f"  [{spec}] {name}: {ms}, saved {saved[name]:.1f} MiB", file=sys.stderr)
    return [
        {
            "case": spec,
            "phase": phase,
            **{n: times[n][phase] for n in IMPLS},
            "gemm_share": share[phase],
            "saved": saved,
        }
        for phase in PHASES
    ]


def table_row(r: dict[str, object]) -> str:
    return (
        f"| {r['case']} | {r['phase']} | "
        + " | ".join(f"{r[n] * 1e3:.2f} ms" for n in IMPLS)
        + f" | {r['demo'] / r['ours']:.2f}x | {r['compiled'] / r['ours']:.2f}x | {r['compiled'] / r['ours_aten']:.2f}x"
        + f" | {100 * r['gemm_share']:.0f}% | "
        + (" / ".join(f"{r['saved'][n]:.1f}" for n in IMPLS) if r["phase"] == "fwd" else "")
        + " |"
    )


def plot_times(records: list[dict[str, object]], path: Path, title: str) -> None:
    """One panel per case: each phase's time per implementation; ours' matrix-product share hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    width = 0.8 / len(IMPLS)
    fig, axes = plt.subplots(1, len(cases), figsize=(0.5 + 4.2 * len(cases), 4.0), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rows = [r for r in records if r["case"] == case]
        for i, name in enumerate(IMPLS):
            xs = [j + (i - (len(IMPLS) - 1) / 2) * width for j in range(len(rows))]
            ms = [r[name] * 1e3 for r in rows]
            bars = ax.bar(xs, ms, width, label=IMPL_LABELS[name])
            ax.bar_label(bars, labels=[f"{m:.1f}" for m in ms], fontsize=7)
            if name == "ours":
                gemm = [m * r["gemm_share"] for m, r in zip(ms, rows, strict=True)]
                ax.bar(xs, gemm, width, fill=False, hatch="//", edgecolor="black", linewidth=0, label="ours: GEMM")
        ax.set_xticks(range(len(rows)), [r["phase"] for r in rows], fontsize=8)
        ax.set_title(case, fontsize=9)
        ax.set_ylabel("ms per step")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(IMPLS) + 1, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default="1x512x4x1024x1024:float32,1x512x4x1024x1024:bfloat16",
        help="comma list of BxTxGxDxDe:dtype (default: the demo's shapes scaled to a 2-core CPU)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per implementation and phase")
    parser.add_argument(
        "--table-rows",
        type=int,
        default=TABLE_ROWS,
        help="table size per head of each n-gram order (the demo: 646,400; default a fiftieth, for a 2-core CPU)",
    )
    parser.add_argument("--no-chart", action="store_true", help="the table only (no matplotlib)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    isolate_inductor_cache()
    if args.device == "cpu":
        keep_freed_memory()
        where = f"CPU, {torch.get_num_threads()} threads; cpu capability {ra.build_info().get('cpu_capability')}; "
        where += "freed memory kept by malloc"
    else:
        where = torch.cuda.get_device_name()
    header = [
        f"# layer benchmark ({args.device})\n\n{where}; torch {torch.__version__}; "
        f"2-gram and 3-gram tables, {NUM_HEADS} heads of {args.table_rows} rows (the next primes) each.\n",
        "| case BxTxGxDxDe | phase | demo | compiled demo | ours | ours, ATen's GEMM | demo/ours | compiled/ours "
        "| compiled/ours with ATen's GEMM | GEMM share of ours "
        "| saved MiB demo / compiled / ours / ours, ATen's GEMM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"layer_{args.device}"
    records: list[dict[str, object]] = []
    for spec in args.cases.split(","):
        records += bench_case(spec.strip(), args.device, args.min_time, args.table_rows)
        text = "\n".join(header + [table_row(r) for r in records]) + "\n"
        stem.with_suffix(".md").write_text(text)  # after every case: a run cut short keeps its rows
    print(text)
    if not args.no_chart:
        plot_times(records, stem.with_suffix(".png"), f"Engram layer per step ({where})")


if __name__ == "__main__":
    main()
