"""Modules that hold the parameters and call the functional API."""

from __future__ import annotations

import torch
from torch import nn

from .functional import gate


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
