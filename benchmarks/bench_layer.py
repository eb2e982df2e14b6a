"""Benchmark the retrieval block as users run it, against the official Engram demo's math.

Three implementations of the block (projection, gate, short convolution; docs/block.md), side by side:

* ``demo``      the demo's ``Engram`` forward rebuilt in plain PyTorch from its published math: a
                value projection and one key projection per branch, per-branch RMSNorms, the signed
                square root gate, then ``o + ShortConv(o)`` in eager ops;
* ``compiled``  ``torch.compile`` of that;
* ``ours``      ``RetrievalAttention``: one fused projection, the fused gate and the fused short convolution.

All three share one set of parameters. The hashing and the table lookup are not timed here.
For each case it reports the median time of the forward and of forward+backward (gradients of
the inputs and of every parameter), the speedups, the share of ours spent in the projection's
matrix products (profiler), and the activations each keeps for its backward (saved tensors
other than parameters and inputs). Results go to stdout and ``<out>/layer_<device>.md``.

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

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")
IMPLS = ("demo", "compiled", "ours")


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


def gemm_share(step: Callable[[], object]) -> float:
    """Fraction of one step's operator self time spent in matrix products (profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    return gemm / total if total else 0.0


def bench_case(spec: str, min_time: float) -> list[str]:
    shape, _, dtype_name = spec.partition(":")
    B, T, G, D, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "float32")
    torch.manual_seed(0)
    block = ra.RetrievalAttention(D, De, G, dtype=dtype)
    with torch.no_grad():  # taps and norms away from their initial zeros and ones
        block.short_conv.weight.normal_(0, 0.2)
        for p in (block.gate.w_q, block.gate.w_k, block.short_conv.norm_weight):
            p.normal_(1, 0.1)
    hidden = torch.randn(B, T, G, D, dtype=dtype, requires_grad=True)
    retrieved = torch.randn(B, T, De, dtype=dtype, requires_grad=True)
    params = demo_params(block)
    eps = torch.finfo(dtype).eps
    compiled = torch.compile(demo_block, dynamic=False)
    leaves = {
        "demo": [hidden, retrieved, *params.values()],
        "compiled": [hidden, retrieved, *params.values()],
        "ours": [hidden, retrieved, *block.parameters()],
    }
    forward = {
        "demo": lambda: demo_block(hidden, retrieved, params, eps),
        "compiled": lambda: compiled(hidden, retrieved, params, eps),
        "ours": lambda: block(hidden, retrieved),
    }
    y = forward["ours"]().detach()
    # The same block: the demo's eager ops round at every op, so bfloat16 agrees only to its own precision.
    tol = 1e-3 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(forward["demo"]().detach(), y, rtol=tol, atol=tol)
    grad_y = torch.randn_like(y)
    times: dict[str, dict[str, float]] = {}
    saved: dict[str, float] = {}
    for name in IMPLS:
        fwd = forward[name]

        def fwd_bwd(fwd=fwd, name=name) -> object:
            return torch.autograd.grad(fwd(), leaves[name], grad_y)

        times[name] = {
            "fwd": median_time(fwd, torch.get_num_threads(), min_time),
            "fwd+bwd": median_time(fwd_bwd, torch.get_num_threads(), min_time),
        }
        saved[name] = saved_mib(fwd, leaves[name])
        ms = {phase: f"{seconds * 1e3:.2f} ms" for phase, seconds in times[name].items()}
        print(
            f"  [{spec}] {name}: fwd {ms['fwd']}, fwd+bwd {ms['fwd+bwd']}, saved {saved[name]:.1f} MiB", file=sys.stderr
        )
    share = gemm_share(lambda: torch.autograd.grad(forward["ours"](), leaves["ours"], grad_y))
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        t = {n: times[n][phase] for n in IMPLS}
        rows.append(
            f"| {spec} | {phase} | "
            + " | ".join(f"{t[n] * 1e3:.2f} ms" for n in IMPLS)
            + f" | {t['demo'] / t['ours']:.2f}x | {t['compiled'] / t['ours']:.2f}x | "
            + (f"{100 * share:.0f}% | " if phase == "fwd+bwd" else "| ")
            + " / ".join(f"{saved[n]:.1f}" for n in IMPLS)
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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    keep_freed_memory()
    header = [
        f"# layer benchmark (cpu)\n\nCPU, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"cpu capability {ra.build_info().get('cpu_capability')}; freed memory kept by malloc.\n",
        "| case BxTxGxDxDe | phase | demo | compiled demo | ours | demo/ours | compiled/ours | GEMM share of ours "
        "| saved MiB demo / compiled / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for spec in args.cases.split(","):
        rows += bench_case(spec.strip(), args.min_time)
    text = "\n".join(header + rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
