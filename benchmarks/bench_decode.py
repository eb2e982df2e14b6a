"""Benchmark decoding through the Engram layer a token per call (docs/block.md): tokens per second.

The layer is ``NgramHashEmbedding`` (2-gram and 3-gram tables, 8 heads) then ``RetrievalAttention``
with its short convolution, at the layer benchmark's width (G = 4, D = D_e = 1024) or ``--shape``.
After a prompt, each call takes one token per sequence with the n-gram history and the
convolution's state, for batches of 1 and 64 sequences. It reports tokens per second (all sequences
together) and the time per call, medians of ``torch.utils.benchmark``. Results go to stdout and
``<out>/decode_<device>.md``.

    PYTHONPATH=torch_ext python benchmarks/bench_decode.py
    PYTHONPATH=torch_ext python benchmarks/bench_decode.py --batches 1,8 --shape 2x64x32
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from bench_gate import add_out_argument, keep_freed_memory, median_time
from bench_layer import NUM_HEADS, TABLE_ROWS, TOKEN_VOCAB

import retrieval_attention as ra

PROMPT = 32


def bench(B: int, G: int, D: int, De: int, device: str, dtype: torch.dtype, min_time: float) -> float:
    """Seconds per decode call of ``B`` sequences, one token each."""
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

        def step() -> torch.Tensor:
            # The state moves on at every call; its values do not change the work done.
            return block(h, memory(token, history=history), conv_state=state)

        return median_time(step, torch.get_num_threads(), min_time)


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
        "a token per sequence per call, after a 32-token prompt.\n",
        "| sequences per call | time per call | tokens per second |",
        "|---|---|---|",
    ]
    for B in (int(b) for b in args.batches.split(",")):
        seconds = bench(B, G, D, De, args.device, dtype, args.min_time)
        lines.append(f"| {B} | {seconds * 1e3:.3f} ms | {B / seconds:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
