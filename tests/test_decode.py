"""Decoding a token at a time (docs/block.md, docs/ngram.md): the n-gram lookup's ``history`` and the
short convolution's state. A prefill and then one token per call give one full forward's outputs."""

from __future__ import annotations

import pytest
import torch

from retrieval_attention import NgramHashEmbedding, RetrievalAttention

from conftest import DEVICES

DECODE_ATOL = 1e-11  # float64: the same rows and sums, up to the order of a few additions


def _history(ids: torch.Tensor, t: int, width: int, pad_id: int) -> torch.Tensor:
    """The ``width`` ids before position t, ``pad_id`` before the start."""
    padded = torch.nn.functional.pad(ids, (width, 0), value=pad_id)
    return padded[:, t : t + width]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_n", [2, 3, 4])
def test_lookup_with_history_equals_the_full_lookup(device: str, max_n: int) -> None:
    vocab = [37, 41, 43][: max_n - 1]
    memory = NgramHashEmbedding.from_seed(vocab, 2, 8, token_vocab_size=100, pad_id=5, device=device)
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(max_n)).to(device)
    full = memory(ids)
    prefill = 4
    parts = [memory(ids[:, :prefill])]
    for t in range(prefill, ids.shape[1]):
        parts.append(memory(ids[:, t : t + 1], history=_history(ids, t, max_n - 1, pad_id=5)))
    assert torch.equal(torch.cat(parts, dim=1), full)
    # A history of pads is a sequence that starts here.
    assert torch.equal(memory(ids, history=torch.full((3, max_n - 1), 5, device=device)), full)


def _block(G: int, D: int, K: int, dilation: int, device: str) -> RetrievalAttention:
    block = RetrievalAttention(D, 12, G, conv_kernel_size=K, conv_dilation=dilation, device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("G", "D", "K", "dilation"), [(1, 8, 4, 3), (3, 33, 4, 3), (2, 16, 3, 1), (2, 5, 1, 2)])
@pytest.mark.parametrize("prefill", [1, 5, 12])
def test_prefill_then_decode_equals_one_forward(
    device: str, G: int, D: int, K: int, dilation: int, prefill: int
) -> None:
    block = _block(G, D, K, dilation, device)
    gen = torch.Generator().manual_seed(G * 100 + D + prefill)
    B, T = 2, 15
    hidden = torch.randn(B, T, G, D, generator=gen, dtype=torch.float64).to(device)
    retrieved = torch.randn(B, T, 12, generator=gen, dtype=torch.float64).to(device)
    want = block(hidden, retrieved)
    state = block.new_conv_state(B)
    assert state.shape == (B, (K - 1) * dilation, G, D) and not state.any()
    parts = [block(hidden[:, :prefill], retrieved[:, :prefill], conv_state=state)]
    for t in range(prefill, T):
        parts.append(block(hidden[:, t : t + 1], retrieved[:, t : t + 1], conv_state=state))
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=0, atol=DECODE_ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_from_a_prefilled_state_continues_the_sequence(device: str) -> None:
    """Two blocks of calls: the state after the first carries over; a fresh state starts over."""
    block = _block(2, 16, 4, 3, device)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 20, 2, 16, generator=gen, dtype=torch.float64).to(device)
    retrieved = torch.randn(1, 20, 12, generator=gen, dtype=torch.float64).to(device)
    want = block(hidden, retrieved)
    state = block.new_conv_state(1)
    block(hidden[:, :13], retrieved[:, :13], conv_state=state)
    rest = block(hidden[:, 13:], retrieved[:, 13:], conv_state=state)
    torch.testing.assert_close(rest, want[:, 13:], rtol=0, atol=DECODE_ATOL)
    fresh = block(hidden[:, 13:], retrieved[:, 13:], conv_state=block.new_conv_state(1))
    assert not torch.allclose(fresh, want[:, 13:])  # without the state, the context is lost


def test_decode_bad_arguments_name_them() -> None:
    block = _block(2, 16, 4, 3, "cpu")
    hidden, retrieved = torch.randn(1, 3, 2, 16, dtype=torch.float64), torch.randn(1, 3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="`state`"):
        block(hidden, retrieved, conv_state=torch.zeros(1, 8, 2, 16, dtype=torch.float64))
    plain = RetrievalAttention(16, 12, 2, short_conv=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="`conv_state`"):
        plain(hidden, retrieved, conv_state=block.new_conv_state(1))
    with pytest.raises(ValueError, match="no short convolution"):
        plain.new_conv_state(1)
    memory = NgramHashEmbedding.from_seed([37, 41], 2, 8, token_vocab_size=100)
    ids = torch.randint(0, 100, (2, 4))
    with pytest.raises(ValueError, match="`history`"):
        memory(ids, history=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="`history` or `cu_seqlens`"):
        memory(ids[:1], history=torch.zeros(1, 2, dtype=torch.int64), cu_seqlens=torch.tensor([0, 4]))


def test_main_job_decodes_as_its_full_forward() -> None:
    """The main job's model: a prompt, then a byte per call (keys and values, n-gram history and convolution
    state carried), gives the logits of one forward over the whole sequence."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train_lm

    cfg = train_lm.Config(dim=32, layers=2, heads=2, seq=40, ngram_vocab=(97, 101), ngram_heads=2, ngram_dim=16)
    model = train_lm.TinyLM(cfg, (0, 1), seed=3).double().eval()
    for engram in model.engrams.values():  # taps and gates away from their start, so every path matters
        with torch.no_grad():
            for p in engram.block.parameters():
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, train_lm.VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)[0]
        cache = model.new_cache(2)
        got = [model(ids[:, :6], cache)[0]] + [model(ids[:, t : t + 1], cache)[0] for t in range(6, 17)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=0, atol=DECODE_ATOL)
    sys.path.remove(str(Path(__file__).resolve().parents[1] / "examples"))
