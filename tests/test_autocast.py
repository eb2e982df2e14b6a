"""The gate and the block under torch.autocast (docs/gate.md): bfloat16 where Linear computes in it.

Under CPU autocast to bfloat16 the gate takes float32 inputs as bfloat16, as ``nn.Linear`` does, and
returns o in bfloat16 and a in float32; float64 is left alone; the gradients reach float32 leaves in
float32; and the same holds inside torch.compile.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from retrieval_attention import RetrievalAttention

from tolerances import assert_agree


def _block() -> RetrievalAttention:
    """A block whose every parameter matters (the conv taps start at zero)."""
    block = RetrievalAttention(32, 24, 2)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


def test_autocast_computes_in_bfloat16_as_linear() -> None:
    block = _block()
    hidden = torch.randn(2, 6, 2, 32, requires_grad=True)
    emb = torch.randn(2, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, a = block(hidden, emb, return_gate=True)
        linear_out = nn.Linear(24, 8)(emb)
        o_op, a_op, _ = torch.ops.retrieval_attention.gate(hidden, hidden, hidden[..., 0, :])
    assert linear_out.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and o_op.dtype == torch.bfloat16 and a_op.dtype == torch.float32
    assert a.dtype == torch.float32
    expected = block(hidden.bfloat16().float(), emb.bfloat16().float())
    assert_agree(y.float(), expected, "y", torch.bfloat16)
    y.float().sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32
    assert block.gate.w_q.grad.dtype == torch.float32
    assert block.kv_proj.weight.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone() -> None:
    h = torch.randn(3, 2, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, a, _ = torch.ops.retrieval_attention.gate(h, h, h[:, 0])
    assert o.dtype == torch.float64 and a.dtype == torch.float64


def test_autocast_under_compile() -> None:
    torch._dynamo.reset()
    block = _block()
    hidden, emb = torch.randn(2, 6, 2, 32), torch.randn(2, 6, 24)

    @torch.compile(fullgraph=True)
    def run(hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block(hidden, emb)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(hidden, emb)
    got = run(hidden, emb)
    assert got.dtype == torch.bfloat16
    assert_agree(got.float(), eager.float(), "y", torch.bfloat16)


def test_short_conv_autocast_computes_in_bfloat16_as_conv1d() -> None:
    """float32 x is cast to bfloat16 as Conv1d's input; float32 parameters stay float32, and so do their grads."""
    x = torch.randn(2, 9, 2, 16, requires_grad=True)
    weight = (0.5 * torch.randn(2 * 16, 1, 4)).requires_grad_()
    norm_weight = (1 + 0.3 * torch.randn(2, 16)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.retrieval_attention.short_conv(x, weight, norm_weight)
        conv_out = nn.Conv1d(4, 4, 3)(torch.randn(1, 4, 8))
    assert conv_out.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    expected = torch.ops.retrieval_attention.short_conv(x.detach().bfloat16(), weight.detach(), norm_weight.detach())
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == norm_weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = torch.ops.retrieval_attention.short_conv(x.double(), weight.double(), norm_weight.double())
    assert y64.dtype == torch.float64
