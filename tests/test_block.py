"""RetrievalAttention (docs/block.md) against a module built as the official Engram demo builds it.

Also the block against the plain-PyTorch reference, the short convolution's causality, and the block's
bad input (each once, in a child process: tests/bad_input.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_attention import RetrievalAttention, ShortConv, reference

import bad_input
from bad_input import BadCase
from conftest import DEVICES
from tolerances import assert_agree, assert_close_to_truth


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


def _grads_as_ours(grads: dict[str, torch.Tensor], G: int) -> dict[str, torch.Tensor]:
    """The demo's parameter gradients, by the demo's names, as those of our parameters."""
    return {
        "kv_proj.weight": torch.cat([grads["value_proj.weight"]] + [grads[f"key_projs.{g}.weight"] for g in range(G)]),
        "kv_proj.bias": torch.cat([grads["value_proj.bias"]] + [grads[f"key_projs.{g}.bias"] for g in range(G)]),
        "gate.w_q": torch.stack([grads[f"norm2.{g}.weight"] for g in range(G)]),
        "gate.w_k": torch.stack([grads[f"norm1.{g}.weight"] for g in range(G)]),
        "short_conv.weight": grads["short_conv.conv.weight"],
        "short_conv.norm_weight": torch.stack([grads[f"short_conv.norms.{g}.weight"] for g in range(G)]),
    }


def _run(module: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and the gradients of <output, grad>, the parameters' under our names."""
    hidden, emb = hidden.detach().requires_grad_(True), emb.detach().requires_grad_(True)
    params = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}  # compiled or not
    y = module(hidden, emb)
    d_hidden, d_emb, *d_params = torch.autograd.grad(y, (hidden, emb, *params.values()), grad.to(y.dtype))
    named = dict(zip(params, d_params, strict=True))
    if isinstance(module, DemoEngram):
        named = _grads_as_ours(named, len(module.key_projs))
    return {"y": y.detach(), "grad hidden": d_hidden, "grad retrieved": d_emb} | {
        f"grad {name}": g for name, g in named.items()
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,D,De,B,T", [(4, 64, 48, 2, 9), (1, 33, 20, 3, 5), (2, 16, 8, 1, 1)])
def test_matches_demo_float64(device: str, G: int, D: int, De: int, B: int, T: int) -> None:
    demo, ours = _pair(G, D, De, torch.float64, device)
    hidden = torch.randn(B, T, G, D, dtype=torch.float64, device=device)
    emb = torch.randn(B, T, De, dtype=torch.float64, device=device)
    grad = torch.randn(B, T, G, D, dtype=torch.float64, device=device)
    expected = _run(demo, hidden, emb, grad)
    for name, got in _run(ours, hidden, emb, grad).items():
        assert_agree(got, expected[name], name)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matches_demo_float32(device: str) -> None:
    """Compiled, in float32, under the fair bound against the demo in float64 (the demo in float32 its peer)."""
    torch._dynamo.reset()
    G, D, De, B, T = 4, 64, 48, 2, 17
    demo, ours = _pair(G, D, De, torch.float32, device)
    truth_demo = copy.deepcopy(demo).double()
    hidden = torch.randn(B, T, G, D, device=device)
    emb = torch.randn(B, T, De, device=device)
    grad = torch.randn(B, T, G, D, device=device)
    compiled = torch.compile(ours, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _run(compiled, hidden, emb, grad)
    same = _run(demo, hidden, emb, grad)
    truth = _run(truth_demo, hidden.double(), emb.double(), grad.double())
    for name, ours_value in got.items():
        assert_close_to_truth(ours_value, truth[name], same[name], torch.float32, name)


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
    assert_agree(y, o, "y")
    assert_agree(a, a_ref, "a")


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
    y = block(hidden, emb, mask)
    assert_agree(y, expected, "y")
    if not short_conv:  # DeepSeek-V4's form: masked rows give hidden itself
        assert torch.equal(y[~mask], hidden[~mask])


def test_single_branch_takes_three_dim_hidden() -> None:
    block = RetrievalAttention(16, 8, 1)
    hidden, emb = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    y = block(hidden, emb)
    assert y.shape == hidden.shape
    assert torch.equal(y, block(hidden.unsqueeze(2), emb).squeeze(2))


def test_short_conv_is_causal_with_dilation() -> None:
    conv = ShortConv(4, 2, kernel_size=4, dilation=3, zero_init=False)
    x = torch.randn(1, 20, 2, 4)
    base = conv(x)
    x2 = x.clone()
    x2[:, 12] += 1.0
    changed = (conv(x2) - base).abs().sum((0, 2, 3)) > 0
    # Position 12 reaches 12, 15, 18 only: taps at t - 0, t - 3, t - 6, t - 9.
    assert changed.nonzero().flatten().tolist() == [12, 15, 18]


def _bad_block_call(hidden_shape: tuple[int, ...], retrieved_shape: tuple[int, ...]):
    def build() -> tuple:
        return RetrievalAttention(16, 8, 2), (torch.randn(hidden_shape), torch.randn(retrieved_shape)), {}

    return build


CASES: dict[str, BadCase] = {
    "attention-hidden_branches": BadCase(
        _bad_block_call((2, 5, 3, 16), (2, 5, 8)), ValueError, "hidden", expected_got=False
    ),
    "attention-hidden_rank": BadCase(
        _bad_block_call((2, 5, 16), (2, 5, 8)),
        ValueError,
        r"hidden must be \[B, T, 2, 16\].*got \[2, 5, 16\]",
        expected_got=False,
    ),
    "attention-retrieved_width": BadCase(
        _bad_block_call((2, 5, 2, 16), (2, 5, 9)),
        ValueError,
        r"retrieved must be \[B, T, 8\].*got \[2, 5, 9\]",
        expected_got=False,
    ),
    "attention-retrieved_tokens": BadCase(
        _bad_block_call((2, 5, 2, 16), (2, 6, 8)), ValueError, "retrieved", expected_got=False
    ),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)


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
