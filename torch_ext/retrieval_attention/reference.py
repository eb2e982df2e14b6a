"""The plain-PyTorch reference of SPEC §5, used by the tests and the benchmarks.

It never calls this library's kernels: one eager PyTorch op at a time, as the
official Engram demo computes the gate.
"""

from __future__ import annotations

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
