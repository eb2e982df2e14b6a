"""The block's projection ``x @ W^T + b``: the ``linear`` operator for float32 on the CPU.

PyTorch sends a float32 ``addmm`` on the CPU to MKL, whose AMD path lacks AVX-512; the operator's CPU
kernel uses oneDNN, which picks the widest instructions of any x86 CPU (csrc/linear.h). Both are
float32 products; their rounding differs. Every other case (other dtypes and devices, autocast,
tensor subclasses such as FSDP's DTensor) is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Benchmarks set this to False to time the block with PyTorch's own product.
use_operator = True


def _operator_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        use_operator
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not is_traceable_wrapper_subclass(x)
        and not is_traceable_wrapper_subclass(weight)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x`` ``[..., in]``, ``weight`` ``[out, in]``, ``bias`` ``[out]`` or None;
    returns ``[..., out]``."""
    if _operator_applies(x, weight):
        return torch.ops.retrieval_attention.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
