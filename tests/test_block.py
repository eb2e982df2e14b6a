"""RetrievalAttention (SPEC §3) against a module built as the official Engram demo builds it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_attention import RetrievalAttention, ShortConv, reference

from conftest import DEVICES


class DemoShortConv(nn.Module):
    """The demo's ShortConv: per-branch nn.RMSNorm, a symmetric-padded depthwise conv cut to T, SiLU."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = x.shape
        normed = torch.cat([self.norms[g](x[:, :, g, :]) for g in range(G)], dim=-1)
        y = self.conv(normed.transpose(1, 2))[..., :T]
        return F.silu(y).transpose(1, 2).reshape(B, T, G, C)


class DemoEngram(nn.Module):
    """The demo's Engram module from the retrieved embeddings on (the hashing is tested apart)."""

    def __init__(self, hidden_size: int, embed_size: int, hc_mult: int, kernel_size: int = 4, dilation: int = 3):
        super().__init__()
        self.hidden_size = hidden_size
        self.value_proj = nn.Linear(embed_size, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(embed_size, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.short_conv = DemoShortConv(hidden_size, kernel_size, dilation, hc_mult)

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        gates = []
        for g, key_proj in enumerate(self.key_projs):
            key = self.norm1[g](key_proj(embeddings))
            query = self.norm2[g](hidden[:, :, g, :])
            s = (key * query).sum(dim=-1) / math.sqrt(self.hidden_size)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            gates.append(s.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(embeddings).unsqueeze(2)
        return value + self.short_conv(value)


def _randomize(module: nn.Module) -> None:
    """Non-trivial norm and conv weights, so every parameter matters to the comparison."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "conv" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)


def _pair(G: int, D: int, De: int, dtype: torch.dtype, device: str = "cpu") -> tuple[DemoEngram, RetrievalAttention]:
    demo = DemoEngram(D, De, G).to(device, dtype)
    _randomize(demo)
    ours = RetrievalAttention(D, De, G, device=device, dtype=dtype)
    ours.load_engram_state_dict(demo.state_dict())
    return demo, ours


def _grads_as_ours(demo: DemoEngram) -> dict[str, torch.Tensor]:
    G = len(demo.key_projs)
    return {
        "kv_proj.weight": torch.cat([demo.value_proj.weight.grad] + [m.weight.grad for m in demo.key_projs]),
        "kv_proj.bias": torch.cat([demo.value_proj.bias.grad] + [m.bias.grad for m in demo.key_projs]),
        "gate.w_q": torch.stack([demo.norm2[g].weight.grad for g in range(G)]),
        "gate.w_k": torch.stack([demo.norm1[g].weight.grad for g in range(G)]),
        "short_conv.weight": demo.short_conv.conv.weight.grad,
        "short_conv.norm_weight": torch.stack([n.weight.grad for n in demo.short_conv.norms]),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,D,De,B,T", [(4, 64, 48, 2, 9), (1, 33, 20, 3, 5), (2, 16, 8, 1, 1)])
def test_matches_demo_float64(device: str, G: int, D: int, De: int, B: int, T: int) -> None:
    demo, ours = _pair(G, D, De, torch.float64, device)
    hidden = torch.randn(B, T, G, D, dtype=torch.float64, device=device, requires_grad=True)
    emb = torch.randn(B, T, De, dtype=torch.float64, device=device, requires_grad=True)
    expected = demo(hidden, emb)
    got = ours(hidden, emb)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    grad = torch.randn_like(expected)
    d_hidden, d_emb = torch.autograd.grad(expected, (hidden, emb), grad, retain_graph=True)
    expected.backward(grad)
    g_hidden, g_emb = torch.autograd.grad(got, (hidden, emb), grad, retain_graph=True)
    got.backward(grad)
    torch.testing.assert_close(g_hidden, d_hidden, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_emb, d_emb, atol=1e-9, rtol=1e-9)
    params = dict(ours.named_parameters())
    for name, expected_grad in _grads_as_ours(demo).items():
        torch.testing.assert_close(params[name].grad, expected_grad, atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matches_demo_float32(device: str) -> None:
    torch._dynamo.reset()
    G, D, De, B, T = 4, 64, 48, 2, 17
    demo, ours = _pair(G, D, De, torch.float32, device)
    compiled = torch.compile(ours, fullgraph=True)
    hidden = torch.randn(B, T, G, D, device=device, requires_grad=True)
    emb = torch.randn(B, T, De, device=device, requires_grad=True)
    expected = demo(hidden, emb)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled(hidden, emb)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (hidden, emb, *demo.parameters()), grad)
    have = torch.autograd.grad(got, (hidden, emb, *ours.parameters()), grad)
    torch.testing.assert_close(have[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(have[1], want[1], atol=1e-4, rtol=1e-4)
    demo_grads = dict(zip([n for n, _ in demo.named_parameters()], want[2:], strict=True))
    for name, p in demo.named_parameters():
        p.grad = demo_grads[name]
    ours_grads = dict(zip([n for n, _ in ours.named_parameters()], have[2:], strict=True))
    for name, expected_grad in _grads_as_ours(demo).items():
        torch.testing.assert_close(ours_grads[name], expected_grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_new_block_is_the_gated_value(device: str) -> None:
    """Zero-initialized taps: SiLU(0) = 0, so y is exactly the gate's o."""
    block = RetrievalAttention(32, 24, 2, device=device)
    hidden = torch.randn(2, 7, 2, 32, device=device)
    emb = torch.randn(2, 7, 24, device=device)
    y, a = block(hidden, emb, return_gate=True)
    kv = block.kv_proj(emb)
    o, a_ref = reference.gate(hidden, kv[..., 32:].unflatten(-1, (2, 32)), kv[..., :32], block.gate.w_q, block.gate.w_k)
    assert a.shape == (2, 7, 2) and a.dtype == torch.float32
    torch.testing.assert_close(y, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("short_conv", [True, False])
def test_matches_reference_with_mask(device: str, short_conv: bool) -> None:
    G, D, De = 3, 40, 24
    block = RetrievalAttention(D, De, G, short_conv=short_conv, device=device, dtype=torch.float64)
    _randomize(block)
    hidden = torch.randn(2, 11, G, D, dtype=torch.float64, device=device)
    emb = torch.randn(2, 11, De, dtype=torch.float64, device=device)
    mask = torch.rand(2, 11, device=device) > 0.3
    conv = block.short_conv
    expected = reference.retrieval_attention(
        hidden,
        emb,
        block.kv_proj.weight,
        block.kv_proj.bias,
        block.gate.w_q,
        block.gate.w_k,
        conv.weight if conv is not None else None,
        conv.norm_weight if conv is not None else None,
        mask=mask,
    )
    torch.testing.assert_close(block(hidden, emb, mask), expected, atol=1e-10, rtol=1e-10)
    if not short_conv:  # DeepSeek-V4's form: masked rows give hidden itself
        torch.testing.assert_close(block(hidden, emb, mask)[~mask], hidden[~mask])


def test_single_branch_takes_three_dim_hidden() -> None:
    block = RetrievalAttention(16, 8, 1)
    hidden, emb = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    y = block(hidden, emb)
    assert y.shape == hidden.shape
    torch.testing.assert_close(y, block(hidden.unsqueeze(2), emb).squeeze(2))


def test_short_conv_is_causal_with_dilation() -> None:
    conv = ShortConv(4, 2, kernel_size=4, dilation=3, zero_init=False)
    x = torch.randn(1, 20, 2, 4)
    base = conv(x)
    x2 = x.clone()
    x2[:, 12] += 1.0
    changed = (conv(x2) - base).abs().sum((0, 2, 3)) > 0
    # Position 12 reaches 12, 15, 18 only: taps at t - 0, t - 3, t - 6, t - 9.
    assert changed.nonzero().flatten().tolist() == [12, 15, 18]


def test_bad_shapes_name_the_argument() -> None:
    block = RetrievalAttention(16, 8, 2)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, 2, 16\].*got \[2, 5, 16\]"):
        block(torch.randn(2, 5, 16), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"retrieved must be \[B, T, 8\].*got \[2, 5, 9\]"):
        block(torch.randn(2, 5, 2, 16), torch.randn(2, 5, 9))


def test_load_engram_state_dict_checks_names_and_shapes() -> None:
    demo = DemoEngram(16, 8, 2)
    sd = demo.state_dict()
    with pytest.raises(KeyError, match=r"key_projs\.2\.weight"):
        RetrievalAttention(16, 8, 3).load_engram_state_dict(sd)
    with pytest.raises(ValueError, match=r"kv_proj.weight is \[48, 9\]"):
        RetrievalAttention(16, 9, 2).load_engram_state_dict(sd)
    with pytest.raises(KeyError, match=r"unexpected keys.*short_conv"):
        RetrievalAttention(16, 8, 2, short_conv=False).load_engram_state_dict(sd)
    sd["multi_head_embedding.embedding.weight"] = torch.zeros(3, 2)  # the n-gram table is skipped
    RetrievalAttention(16, 8, 2).load_engram_state_dict(sd)
    sd["extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected keys.*extra"):
        RetrievalAttention(16, 8, 2).load_engram_state_dict(sd)
    RetrievalAttention(16, 8, 2).load_engram_state_dict(sd, strict=False)


def test_autocast_computes_in_bfloat16_as_linear() -> None:
    block = RetrievalAttention(32, 24, 2)
    _randomize(block)
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
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)
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
    block = RetrievalAttention(32, 24, 2)
    hidden, emb = torch.randn(2, 6, 2, 32), torch.randn(2, 6, 24)

    @torch.compile(fullgraph=True)
    def run(hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block(hidden, emb)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(hidden, emb)
    got = run(hidden, emb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), eager.float(), atol=2e-2, rtol=2e-2)
