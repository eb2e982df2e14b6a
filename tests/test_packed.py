"""Packed sequences (flash-attn's varlen ``cu_seqlens``) through the whole layer: the lookup, the gate and
the short convolution give each sequence, and every gradient, what it would get alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from retrieval_attention import NgramHashEmbedding, RetrievalAttention

from conftest import DEVICES

LENGTHS = [5, 1, 0, 9, 3]  # an empty sequence among them


def _layer(device: str) -> tuple[NgramHashEmbedding, RetrievalAttention]:
    torch.manual_seed(0)
    memory = NgramHashEmbedding.from_seed([37, 41], 2, 8, token_vocab_size=100, device=device, dtype=torch.float64)
    block = RetrievalAttention(16, memory.embed_size, 2, device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return memory, block


def _run(memory, block, ids, hidden, grad, **packed):
    params = [*memory.parameters(), *block.parameters()]
    hidden = hidden.detach().requires_grad_()
    y = block(hidden, memory(ids, **packed), **packed)
    return (y, *torch.autograd.grad(y, [hidden, *params], grad))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_layer_equals_each_sequence_alone(device: str) -> None:
    memory, block = _layer(device)
    T = sum(LENGTHS)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (1, T), generator=gen).to(device)
    hidden = torch.randn(1, T, 2, 16, generator=gen, dtype=torch.float64).to(device)
    grad = torch.randn(1, T, 2, 16, generator=gen, dtype=torch.float64).to(device)
    bounds = [0, *itertools.accumulate(LENGTHS)]
    packed = _run(memory, block, ids, hidden, grad, cu_seqlens=torch.tensor(bounds, device=device))
    # Each sequence alone; its parameter gradients add up over the sequences.
    alone = [
        _run(memory, block, ids[:, a:b], hidden[:, a:b], grad[:, a:b]) for a, b in itertools.pairwise(bounds) if b > a
    ]
    torch.testing.assert_close(packed[0], torch.cat([r[0] for r in alone], dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[1], torch.cat([r[1] for r in alone], dim=1), rtol=0, atol=1e-12)
    for i in range(2, len(packed)):
        torch.testing.assert_close(packed[i], sum(r[i] for r in alone), rtol=1e-10, atol=1e-10)
    unpacked = _run(memory, block, ids, hidden, grad)
    assert not torch.allclose(unpacked[0], packed[0])  # the boundaries do change the result


def test_packed_bad_offsets_name_them() -> None:
    _, block = _layer("cpu")
    hidden, retrieved = torch.randn(1, 6, 2, 16, dtype=torch.float64), torch.randn(1, 6, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        block(hidden, retrieved, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="`cu_seqlens` never to decrease"):
        block(hidden, retrieved, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="`state` or `cu_seqlens`"):
        block(hidden, retrieved, cu_seqlens=torch.tensor([0, 6]), conv_state=block.new_conv_state(1))
