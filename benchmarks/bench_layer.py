"""Benchmark the Engram layer as users run it, against the official Engram demo's math.

Three implementations of the layer (n-gram hashing, table lookup, projection, gate, short
convolution; docs/ngram.md and docs/block.md), side by side:

* ``demo``      the demo's ``Engram`` forward rebuilt in plain PyTorch from its published math: the
                multiply-XOR hashing (``reference.ngram_hash``), one table with per-head offsets, a
                value projection and one key projection per branch, per-branch RMSNorms, the signed
                square root gate, then ``o + ShortConv(o)`` in eager ops;
* ``compiled``  ``torch.compile`` of that;
* ``ours``      ``NgramHashEmbedding`` then ``RetrievalAttention``: the hashing operator, one fused
                projection, the fused gate and the fused short convolution.

All three share one set of parameters, the table included (dense gradients, as the demo's
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
from bench_gate import keep_freed_memory, median_time

import retrieval_attention as ra
from retrieval_attention import reference

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")
IMPLS = ("demo", "compiled", "ours")
PHASES = ("fwd", "bwd", "fwd+bwd")
NUM_HEADS = 8  # hash heads per n-gram order, as the demo
TOKEN_VOCAB = 129280  # the demo's tokenizer


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


def demo_layer(
    ids: torch.Tensor, hidden: torch.Tensor, params: dict[str, torch.Tensor], ngram: ra.NgramHashEmbedding, eps: float
) -> torch.Tensor:
    """The demo's Engram layer: hash, look up (offsets per head), then the block."""
    hashes = reference.ngram_hash(ids, ngram.multipliers, ngram.primes, pad_id=ngram.hash_pad_id)
    retrieved = F.embedding(hashes + ngram.offsets, params["table"]).flatten(-2)
    return demo_block(hidden, retrieved, params, eps)


def profile_share(step: Callable[[], object]) -> float:
    """Fraction of one step's operator self time spent in matrix products (profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    return gemm / total if total else 0.0


def bench_case(spec: str, min_time: float, table_rows: int) -> list[str]:
    shape, _, dtype_name = spec.partition(":")
    B, T, G, D, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "float32")
    torch.manual_seed(0)
    block = ra.RetrievalAttention(D, De, G, dtype=dtype)
    with torch.no_grad():  # taps and norms away from their initial zeros and ones
        block.short_conv.weight.normal_(0, 0.2)
        for p in (block.gate.w_q, block.gate.w_k, block.short_conv.norm_weight):
            p.normal_(1, 0.1)
    heads = min(NUM_HEADS, De // 2)
    ngram = ra.NgramHashEmbedding.from_seed(
        [table_rows, table_rows], heads, De // 2, token_vocab_size=TOKEN_VOCAB, dtype=dtype
    )
    ids = torch.randint(0, TOKEN_VOCAB, (B, T))
    hidden = torch.randn(B, T, G, D, dtype=dtype, requires_grad=True)
    params = demo_params(block)
    params["table"] = ngram.embedding.weight.detach().clone().requires_grad_()
    eps = torch.finfo(dtype).eps
    compiled = torch.compile(demo_layer, dynamic=False)
    ours_params = [*ngram.parameters(), *block.parameters()]
    leaves = {
        "demo": [hidden, *params.values()],
        "compiled": [hidden, *params.values()],
        "ours": [hidden, *ours_params],
    }
    forward = {
        "demo": lambda: demo_layer(ids, hidden, params, ngram, eps),
        "compiled": lambda: compiled(ids, hidden, params, ngram, eps),
        "ours": lambda: block(hidden, ngram(ids)),
    }
    y = forward["ours"]().detach()
    # The same layer: the demo's eager ops round at every op, so bfloat16 agrees only to its own precision.
    tol = 1e-3 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(forward["demo"]().detach(), y, rtol=tol, atol=tol)
    grad_y = torch.randn_like(y)
    threads = torch.get_num_threads()
    times: dict[str, dict[str, float]] = {}
    saved: dict[str, float] = {}
    share: dict[str, float] = {}
    for name in IMPLS:
        fwd = forward[name]
        out = fwd()

        def bwd(out=out, name=name) -> object:
            return torch.autograd.grad(out, leaves[name], grad_y, retain_graph=True)

        def fwd_bwd(fwd=fwd, name=name) -> object:
            return torch.autograd.grad(fwd(), leaves[name], grad_y)

        steps = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
        times[name] = {phase: median_time(step, threads, min_time) for phase, step in steps.items()}
        if name == "ours":
            share = {phase: profile_share(step) for phase, step in steps.items()}
        del out
        saved[name] = saved_mib(fwd, leaves[name])
        ms = ", ".join(f"{phase} {seconds * 1e3:.2f} ms" for phase, seconds in times[name].items())
        print(f"  [{spec}] {name}: {ms}, saved {saved[name]:.1f} MiB", file=sys.stderr)
    rows = []
    for phase in PHASES:
        t = {n: times[n][phase] for n in IMPLS}
        rows.append(
            f"| {spec} | {phase} | "
            + " | ".join(f"{t[n] * 1e3:.2f} ms" for n in IMPLS)
            + f" | {t['demo'] / t['ours']:.2f}x | {t['compiled'] / t['ours']:.2f}x | {100 * share[phase]:.0f}% | "
            + (" / ".join(f"{saved[n]:.1f}" for n in IMPLS) if phase == "fwd" else "")
            + " |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default="1x512x4x1024x1024:float32,1x512x4x1024x1024:bfloat16",
        help="comma list of BxTxGxDxDe:dtype (default: the demo's shapes scaled to a 2-core CPU)",
    )
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per blocked_autorange")
    parser.add_argument(
        "--table-rows",
        type=int,
        default=12928,
        help="table size per head of each n-gram order (the demo: 646,400; default a fiftieth, for a 2-core CPU)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    keep_freed_memory()
    header = [
        f"# layer benchmark (cpu)\n\nCPU, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"cpu capability {ra.build_info().get('cpu_capability')}; freed memory kept by malloc; "
        f"2-gram and 3-gram tables, {NUM_HEADS} heads of {args.table_rows} rows (the next primes) each.\n",
        "| case BxTxGxDxDe | phase | demo | compiled demo | ours | demo/ours | compiled/ours | GEMM share of ours "
        "| saved MiB demo / compiled / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for spec in args.cases.split(","):
        rows += bench_case(spec.strip(), args.min_time, args.table_rows)
    text = "\n".join(header + rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
