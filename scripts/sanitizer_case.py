"""Every CUDA kernel path once, small enough for compute-sanitizer (scripts/gpu_check.sh runs it
under memcheck, racecheck, initcheck and synccheck).

The gate, forward and backward, in every dtype, on the 16-byte vector path (G = 4, D = 256) and
the scalar one (G = 5, odd D = 67), with each block taking more than one row (forward) and more
than one token (backward): N comes from the SM count. The options: weights both, one (w_q in
float32 too) or none, residual, mask, no signed square root, h and grad_o one element past a
16-byte boundary, a gradient for a or none, and a forward without grad. Then ngram_hash on
contiguous, strided and transposed ids, and empty inputs of both operators. Then short_conv, forward
and backward, in every dtype (float32 parameters with bfloat16 x too): taps whose rows overlap and taps
further apart than a tile, a sequence shorter than the context, one tap, odd D and D over a block's
threads, residual or not, and an empty sequence. Then fp8_lookup in every dtype on the vector path
(dim 256, block 32), the scalar one (dim 50, a short last block) and a strided table, and empty indices.
Then decode_step in every dtype with each block taking more than one row: Engram's taps, one tap (no
state), odd D over a block's threads, no gate weights, float32 weights beside bfloat16, and an empty batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import retrieval_attention

DEVICE = "cuda"  # one name, so that a dry run of the logic can point it at the CPU
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHAPES = ((4, 256), (5, 67))  # (G, D): the vector path, the scalar path
# More blocks per SM than any kernel launches at >= 128 threads (2048 threads per SM), so each block
# gets at least ITEMS_PER_BLOCK tokens (backward) and rows (forward).
MAX_BLOCKS_PER_SM = 16
ITEMS_PER_BLOCK = 2
NGRAM_VOCAB = 50_000
NGRAM_TABLE_SIZES = (1009, 2003)  # orders 2 and 3
NGRAM_HEADS = 4
NGRAM_BATCH = 16  # with T = N: more than one grid stride of the ngram kernel
# (B, T, G, D, K, dilation, residual): Engram's taps over several tiles; wide dilation; T < context; K = 1.
SHORT_CONV_CASES = (
    (2, 100, 4, 256, 4, 3, True),
    (1, 90, 2, 67, 3, 40, False),
    (2, 5, 3, 130, 4, 3, True),
    (3, 33, 1, 9, 1, 1, False),
    (2, 0, 2, 16, 4, 3, True),
)
# (G, D, K, dilation, gate weights) of decode_step; its batch comes from the SM count, as the gate's N.
DECODE_CASES = ((4, 256, 4, 3, True), (3, 67, 1, 2, False), (2, 130, 3, 5, True))


@dataclass(frozen=True)
class Options:
    w_q: str = "same"  # "same" (the dtype of h), "float32" or "none"
    w_k: str = "same"
    residual: bool = False
    mask: bool = False
    signed_sqrt: bool = True
    misaligned: bool = False  # h and grad_o start one element into their buffers
    grad_a: bool = True


# Weighted or not crossed with residual or not (the kernels' template flags), each other option at least once.
OPTIONS = (
    Options(),
    Options(w_q="none", w_k="none", residual=True, mask=True),
    Options(w_q="none", w_k="none", signed_sqrt=False, grad_a=False),
    Options(w_q="float32", w_k="none", residual=True, mask=True),
    Options(w_q="none", mask=True, misaligned=True),
    Options(residual=True, misaligned=True, grad_a=False),
)


def misaligned_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` starting one element past its buffer's (16-byte aligned) start."""
    view = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)[1:].view(t.shape)
    return view.copy_(t)


def weight(kind: str, dtype: torch.dtype, G: int, D: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    w_dtype = dtype if kind == "same" else getattr(torch, kind)
    return (1 + 0.1 * torch.randn(G, D, device=DEVICE, dtype=w_dtype)).requires_grad_()


def run_gate(N: int, G: int, D: int, dtype: torch.dtype, opt: Options) -> None:
    """One forward and backward; the gradients reach every input."""
    h = torch.randn(N, G, D, device=DEVICE, dtype=dtype)
    if opt.misaligned:
        h = misaligned_like(h)
    h.requires_grad_()
    k = torch.randn(N, G, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(N, D, device=DEVICE, dtype=dtype, requires_grad=True)
    w_q, w_k = weight(opt.w_q, dtype, G, D), weight(opt.w_k, dtype, G, D)
    mask = torch.arange(N, device=DEVICE) % 3 != 0 if opt.mask else None
    o, a = retrieval_attention.gate(h, k, v, w_q, w_k, mask=mask, residual=opt.residual, signed_sqrt=opt.signed_sqrt)
    grad_o = torch.randn_like(o)
    if opt.misaligned:
        grad_o = misaligned_like(grad_o)
    outputs, grads = [o], [grad_o]
    if opt.grad_a:
        outputs.append(a)
        grads.append(torch.randn_like(a))
    torch.autograd.backward(outputs, grads)


def run_forward_without_grad(N: int, G: int, D: int, dtype: torch.dtype) -> None:
    """Nothing saved for a backward: the forward's other path."""
    h, k = (torch.randn(N, G, D, device=DEVICE, dtype=dtype) for _ in range(2))
    v = torch.randn(N, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        retrieval_attention.gate(h, k, v, residual=True)


def run_ngram_hash(N: int) -> None:
    tables = retrieval_attention.ngram_hash_tables(NGRAM_TABLE_SIZES, NGRAM_HEADS, token_vocab_size=NGRAM_VOCAB)
    multipliers, primes = (t.to(DEVICE) for t in tables[0])  # layer 0's
    wide = torch.randint(0, NGRAM_VOCAB, (NGRAM_BATCH, 2 * N), device=DEVICE)
    for ids in (wide[:, :N].contiguous(), wide[:, ::2], wide[:, :NGRAM_BATCH].t(), wide[:0], wide[:, :0]):
        retrieval_attention.ngram_hash(ids, multipliers, primes, pad_id=0)


# (R, dim, block): the 8-byte vector path, the scalar path (dim and block not multiples of 8).
FP8_CASES = ((300, 256, 32), (301, 50, 12))


def run_fp8_lookup(N: int, dtype: torch.dtype) -> None:
    for R, dim, block in FP8_CASES:
        rows, scales = retrieval_attention.quantize_rows_fp8(torch.randn(R, dim, device=DEVICE), block)
        strided = torch.zeros(R, dim + 8, dtype=torch.uint8, device=DEVICE)[:, 8:]
        strided.copy_(rows.view(torch.uint8))
        indices = torch.randint(0, R, (N,), device=DEVICE)
        for table in (rows, strided.view(torch.float8_e4m3fn)):
            retrieval_attention.fp8_lookup(table, scales, indices, block=block, dtype=dtype)
        retrieval_attention.fp8_lookup(rows, scales, indices[:0], block=block, dtype=dtype)


def run_short_conv(shape: tuple[int, ...], dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One forward and backward; the gradients reach every input."""
    B, T, G, D, K, dilation, residual = shape
    x = torch.randn(B, T, G, D, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(G * D, 1, K, device=DEVICE, dtype=param_dtype)).requires_grad_()
    nw = (1 + 0.1 * torch.randn(G, D, device=DEVICE, dtype=param_dtype)).requires_grad_()
    y = retrieval_attention.short_conv(x, w, nw, dilation=dilation, residual=residual)
    y.backward(torch.randn_like(y))


def run_decode_step(B: int, case: tuple[int, ...], dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One step on k and v viewed in one projection output, the state updated in place."""
    G, D, K, dilation, weighted = case
    kv = torch.randn(B, (G + 1) * D, device=DEVICE, dtype=dtype)
    h = torch.randn(B, G, D, device=DEVICE, dtype=dtype)
    w_q, w_k = (weight("float32" if param_dtype == torch.float32 else "same", dtype, G, D) for _ in range(2))
    w_q, w_k = (w.detach() if weighted else None for w in (w_q, w_k))
    conv_w = 0.5 * torch.randn(G * D, 1, K, device=DEVICE, dtype=param_dtype)
    norm_w = 1 + 0.1 * torch.randn(G, D, device=DEVICE, dtype=param_dtype)
    state = torch.randn(B, (K - 1) * dilation, G, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        retrieval_attention.decode_step(
            h, kv[:, D:].unflatten(-1, (G, D)), kv[:, :D], w_q, w_k, conv_w, norm_w, state, dilation=dilation
        )


def main() -> None:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N = ITEMS_PER_BLOCK * MAX_BLOCKS_PER_SM * sms
    print(f"sanitizer case: {sms} SMs, N = {N}")
    for dtype in DTYPES:
        for G, D in SHAPES:
            for opt in OPTIONS:
                run_gate(N, G, D, dtype, opt)
            run_forward_without_grad(N, G, D, dtype)
            run_gate(0, G, D, dtype, Options(mask=True))
        print(f"  gate {dtype}: done")
    run_ngram_hash(N)
    print("  ngram_hash: done")
    for dtype in DTYPES:
        for shape in SHORT_CONV_CASES:
            run_short_conv(shape, dtype, dtype)
        print(f"  short_conv {dtype}: done")
    run_short_conv(SHORT_CONV_CASES[0], torch.bfloat16, torch.float32)
    for dtype in DTYPES:
        run_fp8_lookup(N, dtype)
    print("  fp8_lookup: done")
    B = N // DECODE_CASES[0][0]  # rows B * G: as many as the gate's N
    for dtype in DTYPES:
        for case in DECODE_CASES:
            run_decode_step(B, case, dtype, dtype)
        run_decode_step(0, DECODE_CASES[0], dtype, dtype)
        print(f"  decode_step {dtype}: done")
    run_decode_step(B, DECODE_CASES[0], torch.bfloat16, torch.float32)
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
