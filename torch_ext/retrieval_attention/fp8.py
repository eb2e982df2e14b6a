"""FP8 n-gram tables for inference (docs/ngram.md#fp8-tables): e4m3 rows with power-of-two block scales.

Each row of the table is split into blocks of ``block`` columns (the last may be shorter); a block is
stored as float8_e4m3fn values ``q`` and one UE8M0 byte ``e`` (an unsigned power-of-two exponent,
``2^(e - 127)``), so that the row is ``q * 2^(e - 127)``. ``quantize_rows_fp8`` converts a table,
``fp8_lookup`` looks rows up and dequantizes them, ``dequantize_rows_fp8`` is the same in plain
PyTorch, and ``Fp8NgramHashEmbedding`` (``NgramHashEmbedding.to_fp8``) is the inference module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ngram import NgramHashEmbedding, _refresh_pad_id_hook

DEFAULT_BLOCK = 32  # columns per scale: DeepSeek-V4.1's Engram tables, [rows, dim // 32] scales
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # a block's magnitude is taken as at least this (DeepSeek's quantizers do so)
_UE8M0_BIAS = 127
_UE8M0_MIN_EXPONENT = -127  # byte 0
_UE8M0_MAX_EXPONENT = 127  # byte 254 (255 is NaN)


def _check_block(block: int, where: str) -> None:
    if block < 1:
        raise ValueError(f"{where}: expected `block` >= 1, but got {block}")


def quantize_rows_fp8(
    weight: torch.Tensor, block: int = DEFAULT_BLOCK, *, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """A table in float8_e4m3fn with one UE8M0 scale per block of ``block`` columns of each row.

    For each block of a row, ``amax = max(max |x|, amax_floor)`` and the scale is the least power of
    two ``2^k >= amax * float32(1 / 448)``, so ``|x| / 2^k <= 448`` never saturates; the values are
    ``x / 2^k`` rounded to nearest even in e4m3. Then ``|x - q * 2^k| <= 2^-4 |x| + 2^-10 * 2^k``
    for every element, and ``2^k < amax / 224``.

    Args:
        weight: ``[R, dim]``, any floating dtype, finite (on any device; the result stays there).
        block: columns per scale; ``ceil(dim / block)`` scales per row, the last block may be shorter.
        amax_floor: the least block magnitude the scale is chosen for (> 0): an all-zero block gets
            the scale of ``amax_floor``.

    Returns:
        ``(rows [R, dim] float8_e4m3fn, scales [R, ceil(dim / block)] uint8)``, both contiguous; a
        scale byte ``e`` stands for ``2^(e - 127)`` (``scales.view(torch.float8_e8m0fnu)`` reads them so).
    """
    where = "quantize_rows_fp8"
    if not weight.is_floating_point():
        raise TypeError(f"{where}: expected `weight` [R, dim] of a floating dtype, but got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: expected `weight` of shape [R, dim], but got {list(weight.shape)}")
    _check_block(block, where)
    if not amax_floor > 0:
        raise ValueError(f"{where}: expected `amax_floor` > 0, but got {amax_floor}")
    R, dim = weight.shape
    num_blocks = -(-dim // block)
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{where}: expected `weight` finite everywhere, but got inf or NaN entries")
    blocks = F.pad(w, (0, num_blocks * block - dim)).view(R, num_blocks, block)
    amax = blocks.abs().amax(dim=-1).clamp_min(amax_floor)
    # amax times the float32 reciprocal of 448, as DeepSeek's quantization kernels compute it.
    ratio = amax * torch.tensor(1 / E4M3_MAX, dtype=torch.float32, device=w.device)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)  # exactly a power of two: one less
    ceil_log2 = ceil_log2.clamp(_UE8M0_MIN_EXPONENT, _UE8M0_MAX_EXPONENT)
    scales = (ceil_log2 + _UE8M0_BIAS).to(torch.uint8)
    q = (blocks / _ue8m0_values(scales).unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.view(R, num_blocks * block)[:, :dim].contiguous(), scales


def _ue8m0_values(scales: torch.Tensor) -> torch.Tensor:
    """The float32 powers of two ``2^(e - 127)`` of UE8M0 bytes (uint8 or float8_e8m0fnu)."""
    return scales.contiguous().view(torch.float8_e8m0fnu).float()


def dequantize_rows_fp8(
    rows: torch.Tensor, scales: torch.Tensor, *, block: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The table ``[R, dim]`` in ``dtype``, in plain PyTorch: ``dtype(float32(q) * 2^(e - 127))``.

    ``rows`` ``[R, dim]`` float8_e4m3fn and ``scales`` ``[R, ceil(dim / block)]`` uint8 or
    float8_e8m0fnu, as :func:`quantize_rows_fp8` returns them. The product is exact in float32 (a
    4-bit significand times a power of two) unless it leaves float32's normal range, so converting
    to ``dtype`` is the one rounding; :func:`fp8_lookup` computes the same bits.
    """
    _check_block(block, "dequantize_rows_fp8")
    dim = rows.shape[1]
    per_column = _ue8m0_values(scales).repeat_interleave(block, dim=1)[:, :dim]
    return (rows.float() * per_column).to(dtype)


def fp8_lookup(
    rows: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    block: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Rows of an FP8 table looked up and dequantized: ``[..., dim]`` for ``indices`` ``[...]``.

    ``out[i] = dequantize_rows_fp8(rows, scales, block=block, dtype=dtype)[indices[i]]``, bit for bit,
    without dequantizing the table. The registered operator ``torch.ops.retrieval_attention.fp8_lookup``
    (CPU and CUDA kernels, no autograd).

    Args:
        rows: ``[R, dim]`` float8_e4m3fn.
        scales: ``[R, ceil(dim / block)]`` uint8 or float8_e8m0fnu, UE8M0 bytes.
        indices: ``[...]`` int64 or int32, each in ``[0, R)`` (an ``IndexError`` on the CPU; a
            device-side assertion on CUDA).
        block: columns per scale.
        dtype: of the output: bfloat16 (default), float16, float32 or float64.
    """
    return torch.ops.retrieval_attention.fp8_lookup(rows, scales, indices, block=block, dtype=dtype)


def fp8_bytes_per_row(dim: int, block: int = DEFAULT_BLOCK) -> int:
    """Bytes an FP8 row of ``dim`` columns takes: ``dim`` values and ``ceil(dim / block)`` scale bytes."""
    return dim + -(-dim // block)


class Fp8NgramHashEmbedding(nn.Module):
    """``NgramHashEmbedding`` for inference with its table in FP8: same hashing, same output shape.

    Built from a module by :meth:`NgramHashEmbedding.to_fp8` (or this constructor): the table
    ``[rows, dim]`` becomes ``rows`` float8_e4m3fn ``[rows, dim]`` and ``scales`` uint8
    ``[rows, ceil(dim / block)]`` (:func:`quantize_rows_fp8`); the hash buffers are shared with the
    source. ``forward`` hashes as the source does and looks the rows up with :func:`fp8_lookup`,
    dequantized to ``dtype``. No gradients; do not call ``.to(dtype)`` on it (that would convert the
    float8 buffers): the output's dtype is ``dtype``.

    Args:
        module: the source, unsharded.
        block: columns per scale (DeepSeek-V4.1's tables: 32).
        dtype: the output's dtype: bfloat16 (default), float16, float32 or float64.

    Shapes: ``forward(ids [B, T] int64) -> [B, T, embed_size]`` with ``cu_seqlens`` and ``history``
    as :meth:`NgramHashEmbedding.forward` takes them.
    """

    # The source's hashing, unchanged: the same buffers and attributes are read.
    hash = NgramHashEmbedding.hash
    _with_history = NgramHashEmbedding._with_history
    _refresh_pad_id = NgramHashEmbedding._refresh_pad_id

    def __init__(
        self, module: NgramHashEmbedding, *, block: int = DEFAULT_BLOCK, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if module.sharding is not None:
            raise ValueError("Fp8NgramHashEmbedding: expected an unsharded `module`, but got a sharded one")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise TypeError(f"Fp8NgramHashEmbedding: expected `dtype` a floating dtype, but got {dtype}")
        self.max_n, self.num_heads = module.max_n, module.num_heads
        self.embed_dim_per_ngram, self.embed_size = module.embed_dim_per_ngram, module.embed_size
        self.pad_id, self.hash_pad_id = module.pad_id, module.hash_pad_id
        for name in ("multipliers", "primes", "offsets", "lookup"):
            self.register_buffer(name, getattr(module, name))
        rows, scales = quantize_rows_fp8(module.embedding.weight, block)
        self.register_buffer("rows", rows)
        self.register_buffer("scales", scales)
        self.block, self.dtype = block, dtype
        self.register_load_state_dict_post_hook(_refresh_pad_id_hook)

    def forward(
        self, ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings ``[B, T, embed_size]`` in ``dtype`` of token ids ``[B, T]`` int64 (see the class)."""
        drop = 0  # leading positions of ids that are history: hashed, not looked up
        if history is not None:
            ids, drop = self._with_history(ids, history, cu_seqlens), history.shape[1]
        index = self.hash(ids, cu_seqlens=cu_seqlens)[:, drop:] + self.offsets
        return fp8_lookup(self.rows, self.scales, index, block=self.block, dtype=self.dtype).flatten(-2)

    def bytes_per_row(self) -> int:
        """Bytes one table row takes here: ``dim`` e4m3 values and ``ceil(dim / block)`` scale bytes."""
        return fp8_bytes_per_row(self.rows.shape[1], self.block)

    def extra_repr(self) -> str:
        return (
            f"max_n={self.max_n}, num_heads={self.num_heads}, embed_size={self.embed_size}, pad_id={self.pad_id}, "
            f"rows={list(self.rows.shape)}, block={self.block}, dtype={self.dtype}"
        )
