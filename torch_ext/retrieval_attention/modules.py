"""Modules that hold the parameters and call the functional API."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
from torch import nn

from ._linear import Linear
from .functional import _DECODE_STEP_DEVICES, decode_step, gate, short_conv


class RetrievalGate(nn.Module):
    """The sigmoid gate with its RMSNorm weights: ``o = a * v`` (or ``h + a * v``).

    Args:
        hidden_size: ``D``, the size of the query, key and value rows.
        num_branches: ``G``, branches (Engram's hyper-connection multiplier) sharing one value.
        eps: RMSNorm epsilon; None means ``torch.finfo(h.dtype).eps``.
        scale: score scale; None means ``1 / sqrt(D)``.
        signed_sqrt: apply ``sign(s) * sqrt(|s|)`` to the score before the sigmoid.
        sqrt_clamp: floor of ``|s|`` under the square root.
        residual: return ``h + a * v``.
        elementwise_affine: hold the weights ``w_q``, ``w_k`` ``[G, D]`` (initialized to 1);
            False means plain RMSNorm without weights.

    Shapes of ``forward(h, k, v, mask=None)``: ``h``, ``k`` ``[..., G, D]``; ``v`` ``[..., D]``;
    ``mask`` ``[...]`` bool. Returns ``(o, a)``: ``o`` ``[..., G, D]``, ``a`` ``[..., G]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_branches: int = 1,
        eps: float | None = None,
        *,
        scale: float | None = None,
        signed_sqrt: bool = True,
        sqrt_clamp: float = 1e-6,
        residual: bool = False,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_branches = num_branches
        self.eps = eps
        self.scale = scale
        self.signed_sqrt = signed_sqrt
        self.sqrt_clamp = sqrt_clamp
        self.residual = residual
        if elementwise_affine:
            factory = {"device": device, "dtype": dtype}
            self.w_q = nn.Parameter(torch.ones(num_branches, hidden_size, **factory))
            self.w_k = nn.Parameter(torch.ones(num_branches, hidden_size, **factory))
        else:
            self.register_parameter("w_q", None)
            self.register_parameter("w_k", None)

    def reset_parameters(self) -> None:
        if self.w_q is not None:
            nn.init.ones_(self.w_q)
            nn.init.ones_(self.w_k)

    def forward(
        self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gate(
            h,
            k,
            v,
            self.w_q,
            self.w_k,
            eps=self.eps,
            scale=self.scale,
            signed_sqrt=self.signed_sqrt,
            sqrt_clamp=self.sqrt_clamp,
            residual=self.residual,
            mask=mask,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_branches={self.num_branches}, eps={self.eps}, "
            f"signed_sqrt={self.signed_sqrt}, residual={self.residual}, affine={self.w_q is not None}"
        )


class ShortConv(nn.Module):
    """The block's short convolution (docs/block.md): ``SiLU(CausalDepthwiseConv1d(RMSNorm_g(x)))``.

    Args:
        hidden_size: ``D``.
        num_branches: ``G``; the convolution has ``G * D`` channels, one RMSNorm weight per branch.
        kernel_size: taps over T (Engram: 4).
        dilation: spacing of the taps (Engram: the largest n-gram order, 3).
        eps: RMSNorm epsilon (Engram's demo: 1e-5).
        zero_init: start with zero taps, so the convolution outputs exactly 0.

    Shapes of ``forward(x)``: ``x`` ``[B, T, G, D]`` in, ``[B, T, G, D]`` out; position t sees
    only positions ``t - i * dilation`` (left padding only).

    Decoding: ``new_state(B)`` is a zero state ``[B, (K - 1) * dilation, G, D]``, the inputs before
    the sequence; ``forward(x, state=state)`` reads it as the left context of ``x`` and updates it in
    place to the last ``(K - 1) * dilation`` inputs, so that a prefill and then one token at a time
    give the outputs of one call over the whole sequence (causal-conv1d's update contract).
    """

    def __init__(
        self,
        hidden_size: int,
        num_branches: int = 1,
        kernel_size: int = 4,
        dilation: int = 3,
        eps: float = 1e-5,
        *,
        zero_init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.num_branches = num_branches
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.eps = eps
        self.zero_init = zero_init
        channels = num_branches * hidden_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, **factory))
        self.norm_weight = nn.Parameter(torch.empty(num_branches, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm_weight)
        if self.zero_init:
            nn.init.zeros_(self.weight)
        else:  # nn.Conv1d's default initialization
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def context(self) -> int:
        """Inputs before a position that its output reads: ``(K - 1) * dilation``."""
        return (self.kernel_size - 1) * self.dilation

    def new_state(self, batch_size: int) -> torch.Tensor:
        """A fresh decoding state ``[B, (K - 1) * dilation, G, D]``: zeros, which the RMSNorm keeps zero,
        as the padding before a sequence."""
        return self.weight.new_zeros(batch_size, self.context, self.num_branches, self.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        *,
        residual: bool = False,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``SiLU(z)``, or ``x + SiLU(z)`` with ``residual`` (one fused operator); ``state``: see the class.

        ``cu_seqlens`` ``[S + 1]``: sequences packed in one row (``x`` ``[1, T, G, D]``), as flash-attn's
        varlen API packs them; no position sees across a boundary.
        """
        if cu_seqlens is not None:
            return self._packed(x, residual, state, cu_seqlens)
        if state is None:
            return short_conv(x, self.weight, self.norm_weight, dilation=self.dilation, eps=self.eps, residual=residual)
        expected = (x.shape[0], self.context, *x.shape[2:])
        if state.shape != expected:
            raise ValueError(f"ShortConv: expected `state` of shape {list(expected)}, but got {list(state.shape)}")
        ctx = self.context
        full = torch.cat([state.to(x.dtype), x], dim=1)
        y = short_conv(full, self.weight, self.norm_weight, dilation=self.dilation, eps=self.eps, residual=residual)
        with torch.no_grad():
            state.copy_(full[:, full.shape[1] - ctx :])
        return y[:, ctx:]

    def _packed(
        self, x: torch.Tensor, residual: bool, state: torch.Tensor | None, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        if state is not None:
            raise ValueError("ShortConv: pass `state` or `cu_seqlens`, not both")
        bounds = cu_seqlens.tolist()
        if x.dim() != 4 or x.shape[0] != 1 or not bounds or bounds[0] != 0 or bounds[-1] != x.shape[1]:
            raise ValueError(
                f"ShortConv: expected `x` [1, T, G, D] and `cu_seqlens` from 0 to T, but got x {list(x.shape)} "
                f"and cu_seqlens {bounds}"
            )
        if any(b < a for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"ShortConv: expected `cu_seqlens` never to decrease, but got {bounds}")
        # One call per sequence: each starts with no left context.
        parts = [self(x[:, a:b], residual=residual) for a, b in itertools.pairwise(bounds) if b > a]
        return torch.cat(parts, dim=1) if parts else x.new_empty(x.shape)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_branches={self.num_branches}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, eps={self.eps}"
        )


class _SplitKV(torch.autograd.Function):
    """``kv`` ``[..., (G + 1) * D]`` -> views ``v`` ``[..., D]`` and ``k`` ``[..., G, D]``.

    Their gradients come back as one ``cat``: autograd's own slice backward would fill a zero
    ``kv``-sized tensor per view, copy into it, and add the two.
    """

    @staticmethod
    def forward(kv: torch.Tensor, G: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kv[..., :D], kv[..., D:].unflatten(-1, (G, D))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, grad_k: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return torch.cat([grad_v, grad_k.flatten(-2)], dim=-1), None, None


class RetrievalAttention(nn.Module):
    """The retrieval block of docs/block.md (Engram's gate), built on the fused gate operator.

    ::

        kv = retrieved @ W_kv^T + b_kv           one matrix product: v, then k of branch 0..G-1
        o, a = gate(hidden, k, v, w_q, w_k)      o = a * v
        y = o + ShortConv(o)                     short_conv=True (the caller adds y to the residual)
        y = hidden + a * v                       short_conv=False (DeepSeek-V4's form, residual included)

    Args:
        hidden_size: ``D``, the size of the hidden state of each branch.
        embed_size: ``D_e``, the size of the retrieved embedding.
        num_branches: ``G`` (Engram's hyper-connection multiplier).
        short_conv: add the short convolution; False gives ``hidden + a * v``.
        conv_kernel_size, conv_dilation, conv_eps: the short convolution's taps, spacing and
            RMSNorm epsilon; its taps start at zero, so a new block outputs the gated value alone.
        eps: the gate's RMSNorm epsilon; None means ``torch.finfo(dtype).eps`` (as the demo).

    Shapes of ``forward(hidden, retrieved, mask=None)``: ``hidden`` ``[B, T, G, D]`` (or
    ``[B, T, D]`` when G = 1), ``retrieved`` ``[B, T, D_e]``, ``mask`` ``[B, T]`` bool. Returns
    ``y`` in the shape of ``hidden``; with ``return_gate=True``, ``(y, a)`` with the gate ``a``
    ``[B, T, G]`` (float32).

    Decoding: ``conv_state = block.new_conv_state(B)``, then ``block(hidden, retrieved,
    conv_state=conv_state)`` for the prompt and for each new token: the state carries the short
    convolution's left context from call to call and is updated in place, so the outputs equal one
    call over the whole sequence. The gate has no state: it sees each token alone. A call of one
    token per sequence (T = 1) with no mask, no ``cu_seqlens`` and no gradient to compute (grad mode
    off, or nothing requiring grad) runs the gate, the convolution and the state's update in one
    kernel, ``decode_step`` (no host synchronization: CUDA graphs capture it); set
    ``fused_decode = False`` to run the gate and ``ShortConv`` instead.

    Packed sequences: ``cu_seqlens`` ``[S + 1]`` with ``B = 1`` (flash-attn's varlen offsets); the
    short convolution does not see across a boundary, so each sequence gets what it would alone.

    The keys and the value are views into the projection's output: the gate reads them in
    place, with no copy.
    """

    def __init__(
        self,
        hidden_size: int,
        embed_size: int,
        num_branches: int = 1,
        short_conv: bool = True,
        conv_kernel_size: int = 4,
        conv_dilation: int = 3,
        eps: float | None = None,
        *,
        conv_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.embed_size = embed_size
        self.num_branches = num_branches
        # Rows 0..D-1 are W_V, then W_K of branch 0..G-1, so one matrix product gives v and every k.
        self.kv_proj = Linear(embed_size, (num_branches + 1) * hidden_size, **factory)
        self.gate = RetrievalGate(hidden_size, num_branches, eps, residual=not short_conv, **factory)
        self.short_conv = (
            ShortConv(hidden_size, num_branches, conv_kernel_size, conv_dilation, conv_eps, **factory)
            if short_conv
            else None
        )
        # Single-token calls with a state through the decode step operator (see forward); False: never.
        self.fused_decode = True

    def new_conv_state(self, batch_size: int) -> torch.Tensor:
        """A fresh decoding state of the short convolution, ``[B, (K - 1) * dilation, G, D]`` (see ``forward``)."""
        if self.short_conv is None:
            raise ValueError(
                "RetrievalAttention.new_conv_state: this block has no short convolution (short_conv=False)"
            )
        return self.short_conv.new_state(batch_size)

    def forward(
        self,
        hidden: torch.Tensor,
        retrieved: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_gate: bool = False,
        conv_state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        G, D = self.num_branches, self.hidden_size
        single = hidden.dim() == 3 and G == 1
        h = hidden.unsqueeze(-2) if single else hidden
        if h.dim() != 4 or h.shape[-2:] != (G, D):
            raise ValueError(
                f"RetrievalAttention: hidden must be [B, T, {G}, {D}]"
                + (f" or [B, T, {D}]" if G == 1 else "")
                + f", got {list(hidden.shape)}"
            )
        if retrieved.dim() != 3 or retrieved.shape[:2] != h.shape[:2] or retrieved.shape[-1] != self.embed_size:
            raise ValueError(
                f"RetrievalAttention: retrieved must be [B, T, {self.embed_size}] with B, T of hidden "
                f"{list(h.shape[:2])}, got {list(retrieved.shape)}"
            )
        if conv_state is not None and self._fused_decode(h, retrieved, mask, conv_state, cu_seqlens):
            y, a = self._decode_step(h, retrieved, conv_state)
        else:
            v, k = _SplitKV.apply(self.kv_proj(retrieved), G, D)
            y, a = self.gate(h, k, v, mask)
            if self.short_conv is not None:
                y = self.short_conv(y, residual=True, state=conv_state, cu_seqlens=cu_seqlens)
            elif conv_state is not None:
                raise ValueError("RetrievalAttention: `conv_state` was given, but this block has no short convolution")
        if single:
            y = y.squeeze(-2)
        return (y, a) if return_gate else y

    def _fused_decode(
        self,
        h: torch.Tensor,
        retrieved: torch.Tensor,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
    ) -> bool:
        """Whether this call is one token per sequence that the decode step operator takes whole."""
        if not self.fused_decode or self.short_conv is None or h.shape[1] != 1:
            return False
        if mask is not None or cu_seqlens is not None:
            return False
        if h.device.type not in _DECODE_STEP_DEVICES or torch.is_autocast_enabled(h.device.type):
            return False
        if conv_state.dtype != h.dtype:  # the other path converts; the operator keeps the state's dtype as is
            return False
        # Inference only: the operator has no backward.
        return not torch.is_grad_enabled() or not (
            h.requires_grad or retrieved.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def _decode_step(
        self, h: torch.Tensor, retrieved: torch.Tensor, conv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, a)`` of one token, ``h`` ``[B, 1, G, D]``, through ``decode_step``; updates ``conv_state``."""
        G, D = self.num_branches, self.hidden_size
        kv = self.kv_proj(retrieved)
        conv = self.short_conv
        return decode_step(
            h,
            kv[..., D:].unflatten(-1, (G, D)),
            kv[..., :D],
            self.gate.w_q,
            self.gate.w_k,
            conv.weight,
            conv.norm_weight,
            conv_state,
            dilation=conv.dilation,
            eps=self.gate.eps,
            scale=self.gate.scale,
            signed_sqrt=self.gate.signed_sqrt,
            sqrt_clamp=self.gate.sqrt_clamp,
            conv_eps=conv.eps,
        )

    @torch.no_grad()
    def load_engram_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load the parameters of the official Engram demo module (its ``Engram`` class).

        Names: ``value_proj.{weight,bias}``, ``key_projs.{g}.{weight,bias}``, ``norm1.{g}.weight``
        (keys), ``norm2.{g}.weight`` (queries), ``short_conv.conv.weight`` and
        ``short_conv.norms.{g}.weight``. ``multi_head_embedding.*`` (the n-gram table) belongs to
        :class:`NgramHashEmbedding` and is skipped. With ``strict``, any other key, a missing key or
        a shape that differs raises.
        """
        G = self.num_branches
        sd = dict(state_dict)
        used = {k for k in sd if k.startswith("multi_head_embedding.")}

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise KeyError(f"load_engram_state_dict: state_dict has no {name!r} (expected for G = {G})")
            used.add(name)
            return sd[name]

        weight = torch.cat([take("value_proj.weight")] + [take(f"key_projs.{g}.weight") for g in range(G)])
        bias = torch.cat([take("value_proj.bias")] + [take(f"key_projs.{g}.bias") for g in range(G)])
        targets = {
            "kv_proj.weight": weight,
            "kv_proj.bias": bias,
            "gate.w_q": torch.stack([take(f"norm2.{g}.weight") for g in range(G)]),
            "gate.w_k": torch.stack([take(f"norm1.{g}.weight") for g in range(G)]),
        }
        if self.short_conv is not None:
            targets["short_conv.weight"] = take("short_conv.conv.weight")
            targets["short_conv.norm_weight"] = torch.stack([take(f"short_conv.norms.{g}.weight") for g in range(G)])
        unused = sorted(set(sd) - used)
        if strict and unused:
            raise KeyError(f"load_engram_state_dict: unexpected keys {unused}")
        params = dict(self.named_parameters())
        for name, value in targets.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"load_engram_state_dict: {name} is {list(params[name].shape)}, the demo's parameters give "
                    f"{list(value.shape)}"
                )
        for name, value in targets.items():
            params[name].copy_(value)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, embed_size={self.embed_size}, num_branches={self.num_branches}, "
            f"short_conv={self.short_conv is not None}"
        )
