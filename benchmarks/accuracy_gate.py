"""Float32 accuracy of the fused gate against PyTorch's own float32 ops, row by row, near zero scores.

Near s = 0 the signed square root amplifies the absolute error of the score (its slope is
1 / (2 sqrt|s|)), so the gradients of the rows with the smallest |s| show how well an implementation
sums its dot products over D. This script computes the gate and all its gradients three ways on the
same float32 inputs:

* ``ours``   ``retrieval_attention.gate`` in float32;
* ``eager``  ``retrieval_attention.reference.gate`` in float32: one PyTorch op at a time, autograd's
             gradients (the reference the tests' bound is built on, docs/accuracy.md);
* ``truth``  the same reference on float64 copies of the inputs, in float64.

The inputs have D = 4096 by default and are built so that most rows have a score near zero: for a
fraction of the rows (``--near-zero``) k is made orthogonal to h * w_q * w_k in float64, plus a small
part along it for a score of log-uniform magnitude between ``10**LOG_S_MIN`` and ``10**LOG_S_MAX``
(some below the default clamp 1e-6, whose gradient is zero); the other rows are plain N(0, 1) draws,
with scores of order 1. The loss uses both outputs: <o, grad_o> + <a, grad_a>, both N(0, 1).

Each row (token n, branch g) gets, per output (``o``, ``a``) and gradient (``h``, ``k``), its max
abs error against the truth. ``grad_v`` is per token; a token counts in the bucket of its row with the
smallest |s|. Rows are ranked by the true |s| and reported in buckets (the 10, 100, 1000, 5000 smallest,
the rest): the worst error of ours and of eager, and on how many (row, output) pairs ours is worse.

Worse means: ours' error is strictly greater than both eager's error on that row and the float32
rounding floor of the row, half an ulp of its largest true value. No float32 result can promise less
than that floor (a correctly rounded one reaches it), so where eager is luckier than correct rounding
on a row ours is not held to that luck. The weight gradients are sums over all tokens, not per row:
they are compared once per call of ``--chunk`` tokens, under the same rule.

Exits with status 1 if ours is worse anywhere. Results go to stdout and ``<out>/accuracy_cpu.md``.

    PYTHONPATH=torch_ext python benchmarks/accuracy_gate.py                      # N=2560 G=4 D=4096: 10,240 rows
    PYTHONPATH=torch_ext python benchmarks/accuracy_gate.py --tokens 5120 --seed 1
    ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=torch_ext python benchmarks/accuracy_gate.py --out avx2_results
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from bench_gate import add_out_argument

import retrieval_attention
from retrieval_attention import reference

IMPLS = ("ours", "eager")
ROW_OUTPUTS = ("o", "a", "h", "k")  # per (n, g) row: the outputs and the gradients w.r.t. h and k
TOKEN_OUTPUTS = ("v",)  # per token n
WEIGHT_GRADS = ("w_q", "w_k")  # sums over the tokens of a call
INPUTS = ("h", "k", "v", "w_q", "w_k")
BUCKET_EDGES = (10, 100, 1000, 5000)  # rank buckets [0, 10), [10, 100), ... by |s|, then the rest
LOG_S_MIN, LOG_S_MAX = -6.5, -1.0  # log10 of the crafted scores' magnitudes; the default clamp is 1e-6
WEIGHT_SPREAD = 0.5  # w_q, w_k = 1 + WEIGHT_SPREAD * N(0, 1), as the tests' harness
EPS = torch.finfo(torch.float32).eps  # the float32 default, given to all three (the truth's inputs are float64)
FLOAT32_MANTISSA_BITS = 24  # with the implicit bit: ulp(x) = 2^(exponent(x) - 24), frexp's exponent


@dataclass(frozen=True)
class Config:
    tokens: int = 2560  # N: 10,240 rows with G = 4
    G: int = 4
    D: int = 4096
    near_zero: float = 0.75  # the fraction of rows crafted with a score near zero
    chunk: int = 256  # tokens per call of the gate (the truth's float64 graph stays small)
    seed: int = 0


def make_inputs(cfg: Config, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """float32 h, k [tokens, G, D], v [tokens, D], w_q, w_k [G, D], grad_o, grad_a; a fraction of rows near s = 0."""
    gen = torch.Generator().manual_seed(seed)
    G, D = cfg.G, cfg.D

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    w_q, w_k = (1 + WEIGHT_SPREAD * randn(G, D) for _ in range(2))
    w_q, w_k = w_q.float().double(), w_k.float().double()  # the float32 weights, exactly
    h, k, v = randn(tokens, G, D), randn(tokens, G, D), randn(tokens, D)
    h = h.float().double()  # k is built from h's float32 values, so its score is the one the kernels see
    # k = k0 + t * u: k0 orthogonal to u = h * w (unit), t chosen for a score of the target size.
    u = h * (w_q * w_k)
    u = u / u.norm(dim=-1, keepdim=True)
    k0 = k - (k * u).sum(-1, keepdim=True) * u
    r_q = torch.rsqrt(h.pow(2).mean(-1) + EPS)
    r_k = torch.rsqrt(k0.pow(2).mean(-1) + EPS)
    hu = (h * (w_q * w_k) * u).sum(-1)
    log_s = LOG_S_MIN + (LOG_S_MAX - LOG_S_MIN) * torch.rand(tokens, G, generator=gen, dtype=torch.float64)
    target = 10.0**log_s * torch.sign(torch.rand(tokens, G, generator=gen, dtype=torch.float64) - 0.5)
    t = target * math.sqrt(D) / (r_q * r_k * hu)  # s = scale * r_q * r_k * t * <h w, u>, r_k ~ that of k0
    near = torch.rand(tokens, G, generator=gen, dtype=torch.float64) < cfg.near_zero
    k = torch.where(near[..., None], k0 + t[..., None] * u, k)
    return {
        "h": h.float(),
        "k": k.float(),
        "v": v.float(),
        "w_q": w_q.float(),
        "w_k": w_k.float(),
        "grad_o": randn(tokens, G, D).float(),
        "grad_a": randn(tokens, G).float(),
    }


def run(impl: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """o, a and the gradients of <o, grad_o> + <a, grad_a> w.r.t. every input, as float64."""
    truth = impl == "truth"
    leaves = [(inputs[n].double() if truth else inputs[n].clone()).requires_grad_(True) for n in INPUTS]
    if impl == "ours":
        o, a = retrieval_attention.gate(*leaves, eps=EPS)
    else:
        o, a = reference.gate(*leaves, eps=EPS, compute_dtype=torch.float64 if truth else None)
    grad_o, grad_a = (inputs[n].to(o.dtype) for n in ("grad_o", "grad_a"))
    grads = torch.autograd.grad([o, a], leaves, [grad_o, grad_a])
    return {"o": o.detach().double(), "a": a.detach().double()} | {
        n: g.double() for n, g in zip(INPUTS, grads, strict=True)
    }


def half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half a float32 ulp of |x| (float64 in, float64 out): the error of correct rounding to float32."""
    _, exponent = torch.frexp(x.abs())
    half = torch.ldexp(torch.full_like(x, 0.5), exponent - FLOAT32_MANTISSA_BITS)
    return torch.where(x == 0, torch.zeros_like(x), half)


def errors(result: torch.Tensor, truth: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``rows``: the max abs error against the truth, and half an ulp of the row's largest |truth|."""
    err = (result - truth).abs().reshape(rows, -1).amax(-1)
    floor = half_ulp(truth.abs().reshape(rows, -1).amax(-1))
    return err, floor


@dataclass
class Comparison:
    """Per-row errors of ours and eager against the truth, their floors, and the true scores."""

    abs_s: torch.Tensor  # [N * G]
    row: dict[str, dict[str, torch.Tensor]]  # output -> {"ours", "eager", "floor"}, [N * G] or [N]
    weight: dict[str, dict[str, torch.Tensor]]  # weight gradient -> {"ours", "eager", "floor"}, one per call


def compare(cfg: Config) -> Comparison:
    """Runs the three implementations over the tokens, ``cfg.chunk`` at a time."""
    names = ROW_OUTPUTS + TOKEN_OUTPUTS
    row: dict[str, dict[str, list[torch.Tensor]]] = {n: {k: [] for k in (*IMPLS, "floor")} for n in names}
    weight: dict[str, dict[str, list[float]]] = {n: {k: [] for k in (*IMPLS, "floor")} for n in WEIGHT_GRADS}
    abs_s = []
    for start in range(0, cfg.tokens, cfg.chunk):
        tokens = min(cfg.chunk, cfg.tokens - start)
        inputs = make_inputs(cfg, tokens, cfg.seed * 1_000_003 + start)
        truth = run("truth", inputs)
        results = {impl: run(impl, inputs) for impl in IMPLS}
        abs_s.append(true_scores(inputs).abs().flatten())
        for name in names:
            rows = tokens * (cfg.G if name in ROW_OUTPUTS else 1)
            for impl in IMPLS:
                err, floor = errors(results[impl][name], truth[name], rows)
                row[name][impl].append(err)
            row[name]["floor"].append(floor)
        for name in WEIGHT_GRADS:
            for impl in IMPLS:
                err, floor = errors(results[impl][name], truth[name], 1)
                weight[name][impl].append(err.item())
            weight[name]["floor"].append(floor.item())
    return Comparison(
        torch.cat(abs_s),
        {n: {k: torch.cat(v) for k, v in d.items()} for n, d in row.items()},
        {n: {k: torch.tensor(v) for k, v in d.items()} for n, d in weight.items()},
    )


def true_scores(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score s of every row [tokens, G] in float64, as the float64 reference computes it."""
    h, k, w_q, w_k = (inputs[n].double() for n in ("h", "k", "w_q", "w_k"))
    D = h.shape[-1]
    qn = torch.nn.functional.rms_norm(h, (D,), None, EPS) * w_q
    kn = torch.nn.functional.rms_norm(k, (D,), None, EPS) * w_k
    return (qn * kn).sum(-1) / math.sqrt(D)


def worse(ours: torch.Tensor, eager: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Where ours' error exceeds both eager's and the float32 rounding floor (see the module docstring)."""
    return ours > torch.maximum(eager, floor)


def buckets(count: int) -> list[tuple[str, int, int]]:
    """(label, first rank, end rank) of the smallest-|s| buckets and the rest, for ``count`` ranked rows."""
    edges = [0, *(e for e in BUCKET_EDGES if e < count), count]
    return [(f"{lo + 1}-{hi}", lo, hi) for lo, hi in itertools.pairwise(edges)]


def table(cmp: Comparison, cfg: Config) -> tuple[str, int]:
    """The markdown table by |s| rank bucket, and the number of rows and weight chunks where ours is worse."""
    order = torch.argsort(cmp.abs_s)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    token_rank = rank.view(-1, cfg.G).amin(-1)  # a token's bucket: that of its smallest-|s| row
    names = ROW_OUTPUTS + TOKEN_OUTPUTS
    heads = ["rows by \\|s\\|", "\\|s\\| up to", *(f"{_label(n)} ours / eager" for n in names), "ours worse"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    total_worse = 0
    for label, lo, hi in buckets(order.numel()):
        cells, bucket_worse = [label, f"{cmp.abs_s[order[hi - 1]].item():.1e}"], 0
        for name in names:
            e = cmp.row[name]
            r = token_rank if name in TOKEN_OUTPUTS else rank
            in_bucket = (r >= lo) & (r < hi)
            bucket_worse += int((worse(e["ours"], e["eager"], e["floor"]) & in_bucket).sum())
            cells.append(" / ".join(_worst(e[impl][in_bucket]) for impl in IMPLS))
        cells.append(str(bucket_worse))
        total_worse += bucket_worse
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in WEIGHT_GRADS:
        w = cmp.weight[name]
        bad = int(worse(w["ours"], w["eager"], w["floor"]).sum())
        total_worse += bad
        lines.append(
            f"{_label(name)} (a sum over {cfg.chunk} tokens, per call): worst {w['ours'].max().item():.1e} ours / "
            f"{w['eager'].max().item():.1e} eager; ours worse in {bad} of {len(w['ours'])} calls."
        )
    return "\n".join(lines) + "\n", total_worse


def _worst(err: torch.Tensor) -> str:
    return f"{err.max().item():.1e}" if err.numel() else "-"


def _label(name: str) -> str:
    return name if name in ("o", "a") else f"grad {name}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=Config.tokens, help="N, tokens (rows: N * G)")
    parser.add_argument("--branches", type=int, default=Config.G, help="G")
    parser.add_argument("--dim", type=int, default=Config.D, help="D")
    parser.add_argument("--near-zero", type=float, default=Config.near_zero, help="fraction of rows near s = 0")
    parser.add_argument("--chunk", type=int, default=Config.chunk, help="tokens per call of the gate")
    parser.add_argument("--seed", type=int, default=Config.seed)
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(args.tokens, args.branches, args.dim, args.near_zero, args.chunk, args.seed)
    cmp = compare(cfg)
    body, total_worse = table(cmp, cfg)
    info = retrieval_attention.build_info()
    header = (
        f"# gate accuracy, float32 (cpu)\n\n"
        f"N={cfg.tokens} G={cfg.G} D={cfg.D}: {cfg.tokens * cfg.G} rows, {cfg.near_zero:.0%} of them crafted near "
        f"s = 0; seed {cfg.seed}; torch {torch.__version__}; cpu capability {info.get('cpu_capability')}. "
        f"Max abs error per row against the float64 truth, worst in each bucket of rows ranked by the true |s|; "
        f"grad v per token (a token in the bucket of its smallest |s|). Ours is worse on a row if its error "
        f"exceeds both eager's and half a float32 ulp of the row's largest true value; 'ours worse' counts "
        f"(row, output) pairs.\n"
    )
    verdict = f"\nOurs worse than the float32 eager reference: {total_worse}.\n"
    text = header + "\n" + body + verdict
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "accuracy_cpu.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return 1 if total_worse else 0


if __name__ == "__main__":
    sys.exit(main())
