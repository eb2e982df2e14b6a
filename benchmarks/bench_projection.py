"""Benchmark the block's projection layouts: which matrix products feed the gate fastest.

The block projects the retrieved embedding ``e`` ``[N, D_e]`` to the value ``v`` ``[N, D]`` and
one key per branch ``k`` ``[N, G, D]`` (docs/block.md). Four ways to the same arithmetic:

* ``operator``  the block's: the ``linear`` operator to ``[N, (G + 1) * D]`` (float32 on the CPU:
                oneDNN's product), v and k strided views of it;
* ``fused``     the same layout in ``F.linear`` (PyTorch's product: MKL on the CPU);
* ``separate``  ``G + 1`` ``F.linear`` of ``[D, D_e]`` each, as the demo; k is then stacked into ``[N, G, D]``;
* ``batched``   one ``baddbmm`` to ``[G + 1, N, D]``; k is ``out[1:]`` seen as ``[N, G, D]`` (the gate
                reads any row strides).

For each it times the forward (the products and whatever makes k) and forward+backward (the
gradients of ``e`` and of the weights), the four in interleaved rounds (bench_gate.interleaved_medians).
Results go to stdout and ``<out>/projection_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_projection.py
    PYTHONPATH=torch_ext python benchmarks/bench_projection.py --cases 8192x4x4096x1024:bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from bench_gate import add_out_argument, interleaved_medians, keep_freed_memory

from retrieval_attention._linear import linear

LAYOUTS = ("operator", "fused", "separate", "batched")


def projections(
    e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, G: int, D: int
) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """Each layout as a function returning (v [N, D], k [N, G, D]) from one weight [(G + 1) * D, D_e]."""
    w_parts, b_parts = weight.split(D), bias.split(D)
    w_batched = weight.unflatten(0, (G + 1, D)).transpose(1, 2)  # [G + 1, D_e, D]
    b_batched = bias.unflatten(0, (G + 1, 1, D))

    def operator() -> tuple[torch.Tensor, torch.Tensor]:
        kv = linear(e, weight, bias)
        return kv[:, :D], kv[:, D:].unflatten(-1, (G, D))

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        kv = F.linear(e, weight, bias)
        return kv[:, :D], kv[:, D:].unflatten(-1, (G, D))

    def separate() -> tuple[torch.Tensor, torch.Tensor]:
        outs = [F.linear(e, w, b) for w, b in zip(w_parts, b_parts, strict=True)]
        return outs[0], torch.stack(outs[1:], dim=1)

    def batched() -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.baddbmm(b_batched, e.expand(G + 1, *e.shape), w_batched)
        return out[0], out[1:].transpose(0, 1)

    return {"operator": operator, "fused": fused, "separate": separate, "batched": batched}


def bench_case(spec: str, device: str, min_time: float) -> list[str]:
    shape, _, dtype_name = spec.partition(":")
    N, G, D, De = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name or "float32")
    torch.manual_seed(0)
    e = torch.randn(N, De, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn((G + 1) * D, De, device=device, dtype=dtype) / De**0.5).requires_grad_()
    bias = torch.randn((G + 1) * D, device=device, dtype=dtype).requires_grad_()
    fns = projections(e, weight, bias, G, D)
    grad_v = torch.randn(N, D, device=device, dtype=dtype)
    grad_k = torch.randn(N, G, D, device=device, dtype=dtype)
    v0, k0 = fns["fused"]()
    steps: dict[str, dict[str, Callable[[], object]]] = {}
    for name in LAYOUTS:
        fn = fns[name]
        v, k = fn()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close((v, k), (v0, k0), rtol=tol, atol=tol)

        def fwd_bwd(fn=fn) -> object:
            v, k = fn()
            return torch.autograd.grad((v, k), (e, weight, bias), (grad_v, grad_k))

        steps[name] = {"fwd": fn, "fwd+bwd": fwd_bwd}
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        t = interleaved_medians({n: steps[n][phase] for n in LAYOUTS}, min_time, device)
        rows.append(
            f"| {spec} | {phase} | "
            + " | ".join(f"{t[n] * 1e3:.3f} ms" for n in LAYOUTS)
            + " | "
            + " | ".join(f"{t[n] / t['operator']:.2f}" for n in LAYOUTS[1:])
            + " |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default="512x4x1024x1024:float32,512x4x1024x1024:bfloat16",
        help="comma list of NxGxDxDe:dtype (default: the layer benchmark's shapes)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per way and phase")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()
    header = [
        f"# projection layouts ({args.device})\n\n{torch.get_num_threads()} threads; torch {torch.__version__}; "
        "time of each way, and its ratio to the block's operator (above 1: slower than the operator).\n",
        "| case NxGxDxDe | phase | operator | fused | separate | batched | fused/operator | separate/operator "
        "| batched/operator |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for spec in args.cases.split(","):
        rows += bench_case(spec.strip(), args.device, args.min_time)
    text = "\n".join(header + rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"projection_{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
