"""Benchmark the fused gate against the plain-PyTorch reference (docs/gate.md, docs/accuracy.md).

Three implementations of the same operator, side by side:

* ``ours``      ``retrieval_attention.gate``: one fused kernel per direction;
* ``eager``     ``retrieval_attention.reference.gate``: one PyTorch op at a time, as the
                official Engram demo computes the gate;
* ``compiled``  ``torch.compile(reference.gate)`` (skip it with ``--no-compile``); its
                buffer donation is off, as the backward is timed with ``retain_graph``.

For each case (N rows, G branches, hidden size D, dtype) it times three phases with
``torch.utils.benchmark.Timer`` (median of ``blocked_autorange`` after a warm-up):

* ``fwd``      the training forward (inputs require grad, so the graph is built);
* ``bwd``      only the backward: ``autograd.grad(o, ...)`` on a forward computed once,
               with ``retain_graph=True``;
* ``fwd+bwd``  both.

It reports the medians, the speedups eager/ours and compiled/ours, the bandwidth ours
achieves (the bytes the operator must move, see ``op_bytes``, over its time) as a
fraction of this machine's copy bandwidth measured in the same run, the peak memory of
one phase above what was allocated before it (CUDA's allocator statistics; on CPU the
profiler's allocation events), and how far ours' peak exceeds the floor of outputs and
gradients the phase must allocate (``floor_bytes``). On CPU, glibc malloc is set
to keep freed memory (``--system-malloc`` leaves it alone). Results go to stdout and to
``<out>/gate_<device>.md``, ``.csv`` and ``.png``.

    PYTHONPATH=torch_ext python benchmarks/bench_gate.py                # all default cases
    PYTHONPATH=torch_ext python benchmarks/bench_gate.py --cases quick --no-compile
    PYTHONPATH=torch_ext python benchmarks/bench_gate.py --cases 4096x2x768:bfloat16
    PYTHONPATH=torch_ext python benchmarks/bench_gate.py --cases 8192x4x4096:bfloat16:misaligned

A case ``NxGxD:dtype:misaligned`` takes h, k and v as views one element into larger buffers, so
their data pointers are not 16-byte aligned and no kernel can read them with 16-byte loads. The
table and CSV are rewritten after every case, so a run cut short keeps the cases it finished; the
chart comes last.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._functorch import config as functorch_config
from torch.utils.benchmark import Timer

import retrieval_attention
from retrieval_attention import reference
from retrieval_attention._inductor_cache import isolate_inductor_cache

GateFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
IMPLS = ("ours", "eager", "compiled")
PHASES = ("fwd", "bwd", "fwd+bwd")
NUM_STATS = 3  # r_q, r_k, s: float32 [N, G] each, saved for the backward (docs/gate.md)
MISALIGNED = "misaligned"  # the case flag: h, k, v start one element past their buffers' start


@dataclass(frozen=True)
class Case:
    n: int
    g: int
    d: int
    dtype: torch.dtype
    misaligned: bool = False

    @property
    def name(self) -> str:
        flag = f" {MISALIGNED}" if self.misaligned else ""
        return f"N={self.n} G={self.g} D={self.d} {str(self.dtype).removeprefix('torch.')}{flag}"


@dataclass
class Row:
    """One case and phase: medians in seconds (None: not run), bytes, peak memory."""

    case: Case
    phase: str
    times: dict[str, float | None]
    op_bytes: int
    peak_mib: dict[str, float | None] = field(default_factory=dict)
    floor_bytes: int = 0


PRESETS: dict[str, dict[str, str]] = {
    "default": {
        "cpu": "2048x4x1024:float32,2048x4x1024:bfloat16,8192x1x512:float32",
        "cuda": "8192x4x2560:bfloat16,8192x4x4096:bfloat16,8192x4x7168:bfloat16,8192x4x1024:float32,"
        "8192x4x4096:bfloat16:misaligned",
    },
    "quick": {"cpu": "2048x4x1024:float32", "cuda": "8192x4x4096:bfloat16"},
}


def parse_cases(spec: str, device: str) -> list[Case]:
    """A preset name (``default``, ``quick``) or a comma list of ``NxGxD[:dtype[:misaligned]]``."""
    spec = PRESETS.get(spec, {}).get(device, spec)
    cases = []
    for item in spec.split(","):
        shape, dtype, *flags = [*item.strip().split(":"), ""]  # the "" stands in for a dtype left out
        if set(flags) - {"", MISALIGNED}:
            raise ValueError(f"bench_gate: unknown case flag in {item!r}; the one flag is {MISALIGNED!r}")
        n, g, d = (int(x) for x in shape.split("x"))
        cases.append(Case(n, g, d, getattr(torch, dtype or "float32"), misaligned=MISALIGNED in flags))
    return cases


def make_inputs(case: Case, device: str, seed: int = 0) -> list[torch.Tensor]:
    """h, k [N, G, D], v [N, D] from randn; w_q, w_k [G, D] near 1; all require grad.

    For a misaligned case h, k and v are contiguous views one element into larger buffers.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    def offset_by_one(t: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
        view = buffer[1:].view(t.shape)
        view.copy_(t)
        return view

    h, k = randn(case.n, case.g, case.d), randn(case.n, case.g, case.d)
    v = randn(case.n, case.d)
    if case.misaligned:
        h, k, v = (offset_by_one(t) for t in (h, k, v))
    w_q, w_k = (1 + 0.1 * randn(case.g, case.d) for _ in range(2))
    return [t.requires_grad_() for t in (h, k, v, w_q, w_k)]


def op_bytes(inputs: Sequence[torch.Tensor], phase: str) -> int:
    """Bytes the operator must move: each tensor read or written once.

    Forward reads h, k, v, w_q, w_k and writes o, a and the stats; backward reads grad_o,
    h, k, v, w_q, w_k, a and the stats and writes dh, dk, dv, dw_q, dw_k.
    """
    h, k, v, w_q, w_k = inputs
    n_rows = h.numel() // h.shape[-1]
    acc_size = 8 if h.dtype == torch.float64 else 4
    nbytes = [t.numel() * t.element_size() for t in (h, k, v, w_q, w_k)]
    tensors = sum(nbytes)  # the inputs, or their gradients (same shapes and dtypes)
    o = nbytes[0]
    gate_and_stats = (1 + NUM_STATS) * n_rows * acc_size
    fwd = tensors + o + gate_and_stats
    bwd = o + tensors + gate_and_stats + tensors  # grad_o, inputs, a + stats; gradients
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def floor_bytes(inputs: Sequence[torch.Tensor], phase: str) -> int:
    """Memory a phase must allocate: its outputs (o, a, stats) and/or the gradients.

    The gate may add only O(N * G) on top (no N * G * D temporary, docs/gate.md), so ours'
    peak minus this floor should stay that small.
    """
    h = inputs[0]
    n_rows = h.numel() // h.shape[-1]
    acc_size = 8 if h.dtype == torch.float64 else 4
    outputs = h.numel() * h.element_size() + (1 + NUM_STATS) * n_rows * acc_size
    gradients = sum(t.numel() * t.element_size() for t in inputs)
    return {"fwd": outputs, "bwd": gradients, "fwd+bwd": outputs + gradients}[phase]


def median_time(fn: Callable[[], object], threads: int, min_run_time: float, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_medians(
    fns: dict[str, Callable[[], object]], min_run_time: float, device: str = "cpu", warmup: int = 3, min_rounds: int = 7
) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed in rounds of one call each.

    A machine whose speed drifts (a shared VM's GEMM throughput moves by 10% from minute to minute)
    then slows every implementation alike, so the ratios hold where back-to-back timing would not.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    while len(samples[next(iter(fns))]) < min_rounds or sum(map(sum, samples.values())) < min_run_time * len(fns):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory instead of returning it to the kernel.

    By default, glibc serves the large temporaries of an eager graph with mmap and unmaps
    them on free, so every op pays fresh page faults: the eager reference then runs 2-4x
    slower on CPU, and erratically. Keeping the memory (as jemalloc or tcmalloc would) is
    the conservative setting for the comparison. Returns False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**30))


def copy_bandwidth(device: str, threads: int, min_run_time: float, mbytes: int = 256) -> float:
    """Bytes/s of ``dst.copy_(src)`` on a large float32 tensor (read + write)."""
    src = torch.randn(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), threads, min_run_time)
    return 2 * src.numel() * src.element_size() / seconds


def phase_fns(fn: GateFn, inputs: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The three timed closures; the backward one reuses a forward computed here."""
    o, _ = fn(*inputs)
    grad_o = torch.randn_like(o)

    def fwd() -> object:
        return fn(*inputs)

    def bwd() -> object:
        return torch.autograd.grad(o, inputs, grad_o, retain_graph=True)

    def fwd_bwd() -> object:
        return torch.autograd.grad(fn(*inputs)[0], inputs, grad_o)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def cpu_peak_mib(step: Callable[[], object]) -> float:
    """Peak CPU memory of one call above what was allocated before it, from the profiler's
    allocation events (the caching-free CPU allocator has no peak counter of its own)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def peak_mib(step: Callable[[], object], device: str) -> float:
    """Peak memory of one call above what was allocated before it."""
    if device != "cuda":
        return cpu_peak_mib(step)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def try_phases(name: str, fn: GateFn, inputs: list[torch.Tensor], case: Case) -> dict[str, Callable[[], object]] | None:
    """The phase closures of ``fn``, or None (with a note) if it raises, e.g. a missing kernel."""
    try:
        fns = phase_fns(fn, inputs)
        fns["fwd+bwd"]()
    except (NotImplementedError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        print(
            f"  [{case.name}] {name}: skipped ({type(error).__name__}: {reason})",
            file=sys.stderr,
        )
        return None
    return fns


def bench_case(case: Case, impls: dict[str, GateFn], device: str, threads: int, min_run_time: float) -> list[Row]:
    """Time every implementation in every phase; a skipped one reads None."""
    inputs = make_inputs(case, device)
    rows = {
        p: Row(case, p, dict.fromkeys(IMPLS), op_bytes(inputs, p), dict.fromkeys(IMPLS), floor_bytes(inputs, p))
        for p in PHASES
    }
    for name, fn in impls.items():
        fns = try_phases(name, fn, inputs, case)
        if fns is None:
            continue
        for phase in PHASES:
            rows[phase].times[name] = median_time(fns[phase], threads, min_run_time)
            rows[phase].peak_mib[name] = peak_mib(fns[phase], device)
        summary = ", ".join(f"{p} {_fmt_ms(rows[p].times[name])}" for p in PHASES)
        print(f"  [{case.name}] {name}: {summary}", file=sys.stderr)
    return [rows[p] for p in PHASES]


def _fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def table_rows(rows: list[Row], copy_bw: float) -> list[dict[str, object]]:
    """Flat records: one per case and phase, used for the CSV, the table and the chart."""
    records = []
    for row in rows:
        t = row.times
        bw = None if t["ours"] is None else row.op_bytes / t["ours"]
        records.append(
            {
                "case": row.case.name,
                "n": row.case.n,
                "g": row.case.g,
                "d": row.case.d,
                "dtype": str(row.case.dtype).removeprefix("torch."),
                "misaligned": row.case.misaligned,
                "phase": row.phase,
                **{f"{name}_ms": None if t.get(name) is None else t[name] * 1e3 for name in IMPLS},
                "eager_over_ours": _ratio(t.get("eager"), t.get("ours")),
                "compiled_over_ours": _ratio(t.get("compiled"), t.get("ours")),
                "op_mbytes": row.op_bytes / 2**20,
                "ours_gbps": None if bw is None else bw / 1e9,
                "ours_frac_of_copy": None if bw is None else bw / copy_bw,
                **{f"peak_mib_{name}": row.peak_mib.get(name) for name in IMPLS},
                "ours_over_floor_mib": None
                if row.peak_mib.get("ours") is None
                else row.peak_mib["ours"] - row.floor_bytes / 2**20,
            }
        )
    return records


def markdown(records: list[dict[str, object]], header: str) -> str:
    cols = [
        "case", "phase", "ours", "eager ref", "compiled ref", "eager/ours", "compiled/ours",
        "ours GB/s", "% of copy BW", "peak MiB ours / eager / compiled", "ours peak - floor MiB",
    ]  # fmt: skip
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        peaks = [r[f"peak_mib_{n}"] for n in IMPLS]
        cells = [
            r["case"],
            r["phase"],
            *(_fmt(r[f"{n}_ms"], ".3f", " ms") for n in IMPLS),
            _fmt(r["eager_over_ours"], ".2f", "x"),
            _fmt(r["compiled_over_ours"], ".2f", "x"),
            _fmt(r["ours_gbps"], ".1f"),
            _fmt(
                None if r["ours_frac_of_copy"] is None else 100 * r["ours_frac_of_copy"],
                ".0f",
                "%",
            ),
            "n/a" if all(p is None for p in peaks) else " / ".join(_fmt(p, ".0f") for p in peaks),
            _fmt(r["ours_over_floor_mib"], ".2f"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _tick_label(record: dict[str, object]) -> str:
    flag = f" {MISALIGNED}" if record["misaligned"] else ""
    return f"{record['n']}x{record['g']}x{record['d']}\n{record['dtype']}{flag}"


def plot_speedups(records: list[dict[str, object]], path: Path, title: str) -> None:
    """One panel per phase: bars eager/ours and compiled/ours per case, log scale, line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = {"vs eager reference": "eager_over_ours", "vs torch.compile(reference)": "compiled_over_ours"}
    width = 0.8 / len(series)
    n_cases = len(records) // len(PHASES)
    fig, axes = plt.subplots(1, len(PHASES), sharey=True, figsize=(2.0 + 1.3 * n_cases * len(PHASES), 4.2))
    for ax, phase in zip(axes, PHASES, strict=True):
        rows = [r for r in records if r["phase"] == phase]
        for i, (label, key) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
            ys = [float("nan") if r[key] is None else r[key] for r in rows]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, labels=[f"{y:.1f}x" if y == y else "n/a" for y in ys], fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.set_xticks(range(len(rows)), [_tick_label(r) for r in rows], fontsize=7)
        ax.set_title(phase, fontsize=9)
    axes[0].set_ylabel("speedup of ours (time ratio)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(series), fontsize=8)
    fig.suptitle(f"{title}; cases NxGxD", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
    )
    parser.add_argument(
        "--cases",
        default="default",
        help="'default', 'quick' or a list NxGxD:dtype,...",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference.gate)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's default)",
    )
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per blocked_autorange")
    parser.add_argument(
        "--system-malloc", action="store_true", help="CPU: leave glibc malloc as it is (see keep_freed_memory)"
    )
    add_out_argument(parser)
    return parser.parse_args(argv)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out``, the results folder every benchmark script writes to."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output folder (default: benchmarks/results)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    isolate_inductor_cache()
    kept = args.device == "cpu" and not args.system_malloc and keep_freed_memory()
    impls: dict[str, GateFn] = {
        "ours": retrieval_attention.gate,
        "eager": reference.gate,
    }
    if not args.no_compile:
        # The backward is timed with retain_graph=True, which compiled backwards that donate
        # their saved buffers refuse; donation only saves memory.
        functorch_config.donated_buffer = False
        impls["compiled"] = torch.compile(reference.gate, dynamic=False)
    cases = parse_cases(args.cases, args.device)

    copy_bw = copy_bandwidth(args.device, threads, args.min_time)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    info = retrieval_attention.build_info()
    header = (
        f"# gate benchmark ({args.device})\n\n"
        f"{where}; torch {torch.__version__}; cpu capability {info.get('cpu_capability')}; "
        f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (256 MB `copy_`); "
        f"median of `blocked_autorange(min_run_time={args.min_time})`; "
        f"malloc {'keeps freed memory' if kept else 'system default'}; "
        f"load average {os.getloadavg()[0]:.2f} at start."
        + ("" if impls.get("compiled") else " torch.compile skipped.")
    )
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gate_{args.device}"
    rows: list[Row] = []
    for done, case in enumerate(cases, start=1):
        rows += bench_case(case, impls, args.device, threads, args.min_time)
        records = table_rows(rows, copy_bw)
        # Rewritten after every case: a run stopped by a time limit keeps the cases it finished.
        progress = "" if done == len(cases) else f"\n\nPartial: {done} of {len(cases)} cases so far."
        text = markdown(records, header + progress)
        stem.with_suffix(".md").write_text(text)
        write_csv(records, stem.with_suffix(".csv"))
    print(text)
    plot_speedups(records, stem.with_suffix(".png"), f"gate speedup of ours ({where})")
    print(f"wrote {stem}.md, .csv, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
