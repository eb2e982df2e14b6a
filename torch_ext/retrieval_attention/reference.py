"""The plain-PyTorch reference of docs/accuracy.md, used by the tests and the benchmarks.

It never calls this library's kernels: one eager PyTorch op at a time, as the
official Engram demo computes the gate.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate(
    h: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor | None = None,
    w_k: torch.Tensor | None = None,
    *,
    eps: float | None = None,
    scale: float | None = None,
    signed_sqrt: bool = True,
    sqrt_clamp: float = 1e-6,
    residual: bool = False,
    mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`retrieval_attention.gate`, with the same arguments and shapes.

    ``compute_dtype`` is the precision of the arithmetic: float32 by default (float64 for
    float64 inputs), as the fused kernels; pass float64 with float64 inputs for the truth.
    ``eps=None`` resolves from ``h.dtype`` before any cast, as ``nn.RMSNorm`` does.
    """
    dtype = h.dtype
    cdt = compute_dtype or _compute_dtype(dtype)
    D = h.shape[-1]
    eps = torch.finfo(dtype).eps if eps is None else eps
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # The weights are per branch, [G, D], so they multiply after F.rms_norm (whose weight is [D]).
    qn = F.rms_norm(h.to(cdt), (D,), None, eps)
    kn = F.rms_norm(k.to(cdt), (D,), None, eps)
    if w_q is not None:
        qn = qn * w_q.to(cdt)
    if w_k is not None:
        kn = kn * w_k.to(cdt)
    s = (qn * kn).sum(-1) * scale
    u = s.abs().clamp_min(sqrt_clamp).sqrt() * s.sign() if signed_sqrt else s
    a = torch.sigmoid(u)
    if mask is not None:
        a = torch.where(mask[..., None], a, torch.zeros_like(a))
    o = a[..., None] * v.to(cdt)[..., None, :]
    if residual:
        o = h.to(cdt) + o
    return o.to(dtype), a


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int = 3, eps: float = 1e-5
) -> torch.Tensor:
    """Reference of the block's short convolution (docs/block.md), branch by branch as the demo.

    ``x`` ``[B, T, G, D]``, ``weight`` ``[G * D, 1, K]``, ``norm_weight`` ``[G, D]``; returns
    ``SiLU(CausalDepthwiseConv1d(RMSNorm_g(x)))`` ``[B, T, G, D]``.
    """
    B, T, G, D = x.shape
    K = weight.shape[-1]
    xn = torch.cat([F.rms_norm(x[:, :, g], (D,), norm_weight[g], eps) for g in range(G)], dim=-1)
    y = F.conv1d(xn.transpose(1, 2), weight, None, 1, (K - 1) * dilation, dilation, G * D)[..., :T]
    return F.silu(y).transpose(1, 2).reshape(B, T, G, D)


def retrieval_attention(
    hidden: torch.Tensor,
    retrieved: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    w_q: torch.Tensor | None,
    w_k: torch.Tensor | None,
    conv_weight: torch.Tensor | None = None,
    conv_norm_weight: torch.Tensor | None = None,
    *,
    eps: float | None = None,
    conv_dilation: int = 3,
    conv_eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the block (docs/block.md): ``hidden`` ``[B, T, G, D]``, ``retrieved`` ``[B, T, D_e]``,
    ``kv_weight`` ``[(G + 1) * D, D_e]``. With ``conv_weight`` None it returns ``hidden + a * v``."""
    G, D = hidden.shape[-2:]
    kv = F.linear(retrieved, kv_weight, kv_bias)
    v, k = kv[..., :D], kv[..., D:].unflatten(-1, (G, D))
    o, _ = gate(hidden, k, v, w_q, w_k, eps=eps, residual=conv_weight is None, mask=mask)
    if conv_weight is None:
        return o
    return o + short_conv(o, conv_weight, conv_norm_weight, dilation=conv_dilation, eps=conv_eps)


def ngram_hash(
    ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    *,
    pad_id: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`retrieval_attention.ngram_hash` (docs/ngram.md), shifted copies as the demo.

    ``ids`` ``[B, T]``, ``multipliers`` ``[max_n]``, ``primes`` ``[max_n - 1, H]``, all int64;
    returns ``[B, T, (max_n - 1) * H]`` int64. torch's int64 multiply wraps around and
    ``torch.remainder`` is the floor modulo, as NumPy's ``*`` and ``%``. With ``cu_seqlens``
    (``ids`` ``[1, T]``), each packed sequence is hashed alone and the results concatenated.
    """
    if cu_seqlens is not None and cu_seqlens.numel() > 1:
        parts = [ids[:, a:b] for a, b in itertools.pairwise(cu_seqlens.tolist())]
        return torch.cat([ngram_hash(p, multipliers, primes, pad_id=pad_id) for p in parts], dim=1)
    T = ids.shape[1]
    max_n = multipliers.shape[0]
    mix = ids * multipliers[0]
    hashes = []
    for n in range(2, max_n + 1):
        shifted = F.pad(ids, (n - 1, 0), value=pad_id)[:, :T]
        mix = torch.bitwise_xor(mix, shifted * multipliers[n - 1])
        hashes.append(torch.remainder(mix[..., None], primes[n - 2]))
    return torch.cat(hashes, dim=-1)
