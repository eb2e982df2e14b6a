"""The functional API: thin, typed wrappers over the registered operators."""

from __future__ import annotations

import torch

# The device types whose dispatch key has an operator's kernel (CUDA only in a build with CUDA), found
# once at import: torch.compile then traces a constant test rather than a dispatcher query.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _devices_with_kernel(op: str) -> frozenset[str]:
    return frozenset(
        device
        for device, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"retrieval_attention::{op}", key)
    )


_SHORT_CONV_DEVICES = _devices_with_kernel("short_conv")
# The devices the block decodes on through decode_step: meta (no autocast state to ask) takes the other path.
_DECODE_STEP_DEVICES = _devices_with_kernel("decode_step") - {"meta"}


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid gate of retrieval attention (docs/gate.md), fused into one kernel per direction.

    For every row (..., g)::

        s = scale * <RMSNorm(h; w_q), RMSNorm(k; w_k)>
        a = sigmoid(sign(s) * sqrt(max(|s|, sqrt_clamp)))    (sigmoid(s) if not signed_sqrt)
        o = a * v                                             (h + a * v with residual)

    Args:
        h: queries (hidden states), ``[..., G, D]``, float32, float64, float16 or bfloat16.
        k: keys, ``[..., G, D]``, the dtype of ``h``.
        v: value shared by the ``G`` branches, ``[..., D]``, the dtype of ``h``.
        w_q: RMSNorm weight of the queries, ``[G, D]``, the dtype of ``h`` or float32; None for none.
        w_k: RMSNorm weight of the keys, ``[G, D]``, the dtype of ``h`` or float32; None for none.
        eps: RMSNorm epsilon; None means ``torch.finfo(h.dtype).eps``, as ``nn.RMSNorm``.
        scale: score scale; None means ``1 / sqrt(D)``.
        signed_sqrt: pass the score through ``sign(s) * sqrt(|s|)`` before the sigmoid.
        sqrt_clamp: floor of ``|s|`` under the square root (its gradient is 0 below it).
        residual: return ``h + a * v`` instead of ``a * v``.
        mask: ``[...]`` bool; rows where it is False get ``a = 0`` and no gradient through the gate.

    Returns:
        ``(o, a)``: ``o`` ``[..., G, D]`` in the dtype of ``h``, and the gate ``a`` ``[..., G]`` in
        float32 (float64 for float64 inputs). Both are differentiable. Without grad (no input
        requires it, or under ``torch.no_grad``) nothing is saved or written for a backward.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, k, v, w_q, w_k))
    o, a, _ = torch.ops.retrieval_attention.gate(
        h,
        k,
        v,
        w_q,
        w_k,
        eps=eps,
        scale=scale,
        signed_sqrt=signed_sqrt,
        sqrt_clamp=sqrt_clamp,
        residual=residual,
        mask=mask,
        save_stats=needs_grad,
    )
    return o, a


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    dilation: int = 3,
    eps: float = 1e-5,
    residual: bool = True,
) -> torch.Tensor:
    """The block's short convolution (docs/block.md), fused into one kernel per direction::

        xn = RMSNorm_g(x; norm_weight[g], eps)                        per branch g
        z[t] = sum_i weight[:, 0, i] * xn[t - (K - 1 - i) * dilation]  causal: zero before the start
        y = x + SiLU(z)                                               (SiLU(z) with residual=False)

    Args:
        x: ``[B, T, G, D]``, float32, float64, float16 or bfloat16; any strides.
        weight: depthwise taps ``[G * D, 1, K]`` (``nn.Conv1d``'s layout), the dtype of ``x`` or float32.
        norm_weight: ``[G, D]``, the dtype of ``x`` or float32.
        dilation: spacing of the taps, ``>= 1``.
        eps: RMSNorm epsilon, ``>= 0``.
        residual: add ``x`` to the output.

    Returns:
        ``y`` ``[B, T, G, D]``, contiguous, the dtype of ``x``. Differentiable in ``x``, ``weight``
        and ``norm_weight``; the backward saves only the inputs and recomputes the rest. Runs on the
        CPU and CUDA kernels; other devices (and CUDA in a build without it) take the same math in PyTorch ops.
    """
    if x.device.type not in _SHORT_CONV_DEVICES:
        return _short_conv_eager(x, weight, norm_weight, dilation=dilation, eps=eps, residual=residual)
    return torch.ops.retrieval_attention.short_conv(
        x, weight, norm_weight, dilation=dilation, eps=eps, residual=residual
    )


def decode_step(
    h: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor | None,
    w_k: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_norm_weight: torch.Tensor,
    conv_state: torch.Tensor,
    *,
    dilation: int = 3,
    eps: float | None = None,
    scale: float | None = None,
    signed_sqrt: bool = True,
    sqrt_clamp: float = 1e-6,
    conv_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence through the gate and the short convolution, in one kernel (docs/block.md)::

        o, a = gate(h, k, v, w_q, w_k)                          residual off
        y = o + SiLU(conv(RMSNorm_g([conv_state; o])))          the new token's output
        conv_state <- [conv_state[:, 1:]; o]                    in place

    Args:
        h: ``[B, G, D]`` or ``[B, 1, G, D]``, float32, float64, float16 or bfloat16; rows contiguous in D,
            other strides free (a view, as the gate reads it).
        k: keys in the shape of ``h``, the dtype of ``h``.
        v: value ``[B, D]`` (``[B, 1, D]`` with a 4-dim ``h``), the dtype of ``h``.
        w_q, w_k: the gate's RMSNorm weights ``[G, D]`` (the dtype of ``h`` or float32), or None.
        conv_weight: taps ``[G * D, 1, K]``; conv_norm_weight: ``[G, D]`` (the dtype of ``h`` or float32).
        conv_state: ``[B, (K - 1) * dilation, G, D]``, contiguous, the dtype of ``h``: the short
            convolution's last inputs ``o`` (``RetrievalAttention.new_conv_state``); updated in place.
        dilation, conv_eps: the short convolution's; eps, scale, signed_sqrt, sqrt_clamp: the gate's.

    Returns:
        ``(y, a)``: ``y`` in the shape and dtype of ``h``; the gate ``a`` ``h.shape[:-1]`` in float32
        (float64 for float64 inputs). Inference only: raises if an input requires grad in grad mode.
        No value is read back to the host, so CUDA graphs capture it.
    """
    return torch.ops.retrieval_attention.decode_step(
        h,
        k,
        v,
        w_q,
        w_k,
        conv_weight,
        conv_norm_weight,
        conv_state,
        dilation=dilation,
        eps=eps,
        scale=scale,
        signed_sqrt=signed_sqrt,
        sqrt_clamp=sqrt_clamp,
        conv_eps=conv_eps,
    )


def _short_conv_eager(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int, eps: float, residual: bool
) -> torch.Tensor:
    """short_conv in PyTorch ops, for devices without its kernel."""
    B, T, G, D = x.shape
    K = weight.shape[-1]
    xn = torch.nn.functional.rms_norm(x, (D,), None, eps) * norm_weight.to(x.dtype)
    xc = torch.nn.functional.pad(xn.reshape(B, T, G * D).transpose(1, 2), ((K - 1) * dilation, 0))
    z = torch.nn.functional.conv1d(xc, weight.to(x.dtype), None, 1, 0, dilation, G * D)
    out = torch.nn.functional.silu(z).transpose(1, 2).reshape(B, T, G, D)
    return x + out if residual else out


def ngram_hash(
    ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    *,
    pad_id: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hashed n-gram ids of token ids (docs/ngram.md), as the Engram demo's ``NgramHashMapping``.

    For orders ``n = 2..max_n`` and heads ``j = 0..H-1``::

        mix_t(n) = XOR_{i < n} ids[b, t - i] * multipliers[i]    (pad_id where t - i < 0)
        out[b, t, (n - 2) * H + j] = mix_t(n) mod primes[n - 2, j]

    The products wrap around in int64 and the modulo is the floor modulo (Python's ``%``), so
    every output is in ``[0, primes[n - 2, j])``. The hashing runs on the device of ``ids``.

    Args:
        ids: token ids ``[B, T]``, int64, ``>= 0``; any strides. A negative id raises on the CPU;
            on CUDA it is not looked for (that would cost a device sync) and hashes like any other.
        multipliers: ``[max_n]`` int64 (odd), ``max_n >= 2``; on the device of ``ids``.
        primes: ``[max_n - 1, H]`` int64, every entry ``> 0``; on the device of ``ids``. On CUDA the
            check copies them to the host (a stream sync), except while a CUDA graph is captured.
        pad_id: ``>= 0``, the token taken before the start of every sequence.
        cu_seqlens: ``[S + 1]`` int32 or int64 on the device of ``ids``, or None: ``S`` sequences
            packed in one row (``ids`` ``[1, T]``), sequence ``s`` at ``[cu_seqlens[s],
            cu_seqlens[s + 1])`` (flash-attn's varlen convention). No n-gram crosses a boundary:
            each sequence starts padded, and hashes as it would alone. The offsets must start at
            0, never decrease and end at ``T``; on CUDA that check copies them to the host.

    Returns:
        ``[B, T, (max_n - 1) * H]`` int64, contiguous, order-major then head. Not differentiable.
    """
    return torch.ops.retrieval_attention.ngram_hash(ids, multipliers, primes, pad_id=pad_id, cu_seqlens=cu_seqlens)
