"""Fake (meta) kernels of the operators, for torch.compile, torch.export and opcheck.

The schemas live in csrc/ops.cpp and autograd at the Autograd key in
csrc/autograd/; only the shape functions are Python. Outputs are contiguous, as the
real kernels return them.
"""

from __future__ import annotations

import torch

_NUM_STATS = 3


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The gate's scalar options (eps, scale, ...) do not change shapes: they pass as **options, so a new
# option leaves the fake kernels as they are.
@torch.library.register_fake("retrieval_attention::gate")
def _gate_fake(
    h: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor | None = None,
    w_k: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    save_stats: bool = True,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = h.shape[:-1]
    acc = _acc_dtype(h.dtype)
    stats = h.new_empty((_NUM_STATS, *rows) if save_stats else (0,), dtype=acc)
    return h.new_empty(h.shape), h.new_empty(rows, dtype=acc), stats


@torch.library.register_fake("retrieval_attention::gate_backward")
def _gate_backward_fake(
    grad_o: torch.Tensor,
    grad_a: torch.Tensor | None,
    a: torch.Tensor,
    stats: torch.Tensor,
    h: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor | None = None,
    w_k: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def weight_grad(w: torch.Tensor | None) -> torch.Tensor:
        return h.new_empty((0,)) if w is None else w.new_empty(w.shape)

    return h.new_empty(h.shape), k.new_empty(k.shape), v.new_empty(v.shape), weight_grad(w_q), weight_grad(w_k)


@torch.library.register_fake("retrieval_attention::ngram_hash")
def _ngram_hash_fake(
    ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    *,
    pad_id: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    B, T = ids.shape
    return ids.new_empty((B, T, (multipliers.shape[0] - 1) * primes.shape[1]), dtype=torch.int64)


@torch.library.register_fake("retrieval_attention::short_conv")
def _short_conv_fake(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, **options: object
) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake("retrieval_attention::short_conv_backward")
def _short_conv_backward_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, **options: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), norm_weight.new_empty(norm_weight.shape)


@torch.library.register_fake("retrieval_attention::decode_step")
def _decode_step_fake(
    h: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_q: torch.Tensor | None,
    w_k: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_norm_weight: torch.Tensor,
    conv_state: torch.Tensor,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    return h.new_empty(h.shape), h.new_empty(h.shape[:-1], dtype=_acc_dtype(h.dtype))


@torch.library.register_fake("retrieval_attention::linear")
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("retrieval_attention::linear_backward")
def _linear_backward_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def grad(needed: bool, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return like.new_empty(shape if needed else (0,))

    return (
        grad(output_mask[0], x, x.shape),
        grad(output_mask[1], weight, weight.shape),
        grad(output_mask[2], weight, weight.shape[:1]),
    )


@torch.library.register_fake("retrieval_attention::fp8_lookup")
def _fp8_lookup_fake(
    rows: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor, *, block: int, dtype: torch.dtype
) -> torch.Tensor:
    return rows.new_empty((*indices.shape, rows.shape[1]), dtype=dtype)


@torch.library.register_fake("retrieval_attention::lookup")
def _lookup_fake(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return weight.new_empty((*indices.shape, weight.shape[1]))


@torch.library.register_fake("retrieval_attention::lookup_backward")
def _lookup_backward_fake(grad: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    return grad.new_empty((num_rows, grad.shape[-1]))
