"""Benchmark decoding through the Engram layer a token per call (docs/block.md): tokens per second.

The layer is ``NgramHashEmbedding`` (2-gram and 3-gram tables, 8 heads) then ``RetrievalAttention``
with its short convolution, at the layer benchmark's width (G = 4, D = D_e = 1024) or ``--shape``.
After a prompt, each call takes one token per sequence with the n-gram history and the
convolution's state, for batches of 1 and 64 sequences. Two paths of the block: the fused decode
step (``decode_step``, one kernel after the projection) and the existing one (the gate, then
``ShortConv``'s cat, convolution and state copy; ``block.fused_decode = False``), timed in
interleaved rounds (bench_gate.interleaved_medians): the step alone (after the projection), the
block and the whole layer. It reports the medians per call and the layer's tokens per second (all
sequences together). Results go to stdout and ``<out>/decode_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_decode.py
    PYTHONPATH=torch_ext python benchmarks/bench_decode.py --batches 1,8 --shape 2x64x32 --device cuda
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from bench_gate import add_out_argument, interleaved_medians, keep_freed_memory
from bench_layer import NUM_HEADS, TABLE_ROWS, TOKEN_VOCAB

import retrieval_attention as ra

PROMPT = 32


PATHS = ("fused", "existing")
PARTS = ("step", "block", "layer")  # the gate and convolution alone; with the projection; with the n-gram lookup too


def bench(B: int, G: int, D: int, De: int, device: str, dtype: torch.dtype, min_time: float) -> dict[str, float]:
    """Median seconds per decode call of ``B`` sequences, one token each: ``step <path>`` (after the projection),
    ``block <path>`` (the retrieved embedding given) and ``layer <path>`` (the n-gram lookup too), both paths."""
    torch.manual_seed(0)
    memory = ra.NgramHashEmbedding.from_seed(
        [TABLE_ROWS, TABLE_ROWS], NUM_HEADS, De // 2, token_vocab_size=TOKEN_VOCAB, device=device, dtype=dtype
    )
    block = ra.RetrievalAttention(D, De, G, device=device, dtype=dtype).eval()
    ids = torch.randint(0, TOKEN_VOCAB, (B, PROMPT + 1), device=device)
    hidden = torch.randn(B, PROMPT + 1, G, D, device=device, dtype=dtype)
    width = memory.max_n - 1
    state = block.new_conv_state(B)
    with torch.no_grad():
        block(hidden[:, :PROMPT], memory(ids[:, :PROMPT]), conv_state=state)
        history = ids[:, PROMPT - width : PROMPT]
        token, h = ids[:, PROMPT:], hidden[:, PROMPT:]
        retrieved = memory(token, history=history)

        def run(fused: bool, lookup: bool) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                # The state moves on at every call; its values do not change the work done.
                block.fused_decode = fused
                return block(h, memory(token, history=history) if lookup else retrieved, conv_state=state)

            return step

        # The step alone, after the projection: the decode step operator, or the gate then ShortConv with the state.
        kv = block.kv_proj(retrieved)
        v, k = kv[..., :D], kv[..., D:].unflatten(-1, (G, D))
        conv = block.short_conv

        def step_fused() -> torch.Tensor:
            w_q, w_k = block.gate.w_q, block.gate.w_k
            return ra.decode_step(h, k, v, w_q, w_k, conv.weight, conv.norm_weight, state, dilation=conv.dilation)[0]

        def step_existing() -> torch.Tensor:
            return conv(block.gate(h, k, v)[0], residual=True, state=state)

        fns = {"step fused": step_fused, "step existing": step_existing}
        fns.update({f"{part} {path}": run(path == "fused", part == "layer") for part in PARTS[1:] for path in PATHS})
        return interleaved_medians(fns, min_time, device)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,64", help="comma list of sequences per call")
    parser.add_argument("--shape", default="4x1024x1024", help="GxDxDe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-time", type=float, default=1.0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        keep_freed_memory()
    G, D, De = (int(x) for x in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    lines = [
        f"# decode through the layer ({args.device})\n",
        f"{torch.get_num_threads()} threads; torch {torch.__version__}; G={G} D={D} D_e={De} {args.dtype}; "
        "a token per sequence per call, after a 32-token prompt. Fused: the decode step operator; existing: "
        "the gate, then ShortConv with its state. Step: after the projection; block: with it; layer: with the "
        "n-gram lookup too. Medians of interleaved rounds.\n",
        "| sequences per call | step, fused | step, existing | block, fused | block, existing | layer, fused "
        "| layer, existing | tokens/s, fused | tokens/s, existing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for B in (int(b) for b in args.batches.split(",")):
        t = bench(B, G, D, De, args.device, dtype, args.min_time)
        times = " | ".join(f"{t[f'{part} {path}'] * 1e3:.3f} ms" for part in PARTS for path in PATHS)
        rates = " | ".join(f"{B / t[f'layer {path}']:,.0f}" for path in PATHS)
        lines.append(f"| {B} | {times} | {rates} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
