"""The retrieval gate on "Harry Potter dropped his wand" (docs/README.md), end to end on toy numbers.

Every token gets a hidden state ``h`` (G = 2 branches of size D = 64) and a retrieved
memory: the embedding ``e`` of the hashed bigram that ends at it, projected to a key per
branch, ``k = e W_K``, and one value, ``v = e W_V``. The gate compares context and memory,
``a = sigmoid(signed_sqrt(<RMSNorm(h), RMSNorm(k)> / sqrt(D)))``, and lets ``o = a * v``
through. Random memories give gates near 0.5; to show the two extremes, "Potter" branch 0
retrieves a memory that agrees with its context (key = 3 h: the gate opens) and "wand"
branch 1 one that contradicts it (key = -2 h: the gate closes).

The script runs the fused ``retrieval_attention.gate`` through ``RetrievalGate``, checks it
against the plain-PyTorch ``reference.gate``, then backpropagates a toy loss to show that
gradients reach the hidden states, the projections and the RMSNorm weights.

    PYTHONPATH=torch_ext python examples/harry_potter.py      (or: make demo)
"""

from __future__ import annotations

import zlib

import torch

import retrieval_attention
from retrieval_attention import RetrievalGate, reference

SENTENCE = "Harry Potter dropped his wand"
D, G, D_E, TABLE_SIZE = 64, 2, 32, 101  # hidden size, branches, embedding size, hash table rows
AGREE = {("Potter", 0): 3.0, ("wand", 1): -2.0}  # token, branch -> key = factor * h


def bigram_ids(tokens: list[str]) -> list[int]:
    """Row of the bigram ending at each token in a hashed table (Engram hashes n-grams, docs/ngram.md)."""
    previous = ["<s>", *tokens[:-1]]
    return [zlib.crc32(f"{p} {t}".encode()) % TABLE_SIZE for p, t in zip(previous, tokens, strict=True)]


def toy_inputs(tokens: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Hidden states, the hashed bigram table and the projections W_K [G, D_E, D], W_V [D_E, D]."""
    return {
        "h": torch.randn(len(tokens), G, D, generator=gen),
        "table": torch.randn(TABLE_SIZE, D_E, generator=gen),
        "W_K": torch.randn(G, D_E, D, generator=gen) / D_E**0.5,
        "W_V": torch.randn(D_E, D, generator=gen) / D_E**0.5,
    }


def retrieve(tokens: list[str], x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """k = e W_K (per branch) and v = e W_V, then plant the agreeing / contradicting memories."""
    e = x["table"][bigram_ids(tokens)]  # [T, D_E]
    k = torch.einsum("te,ged->tgd", e, x["W_K"])  # [T, G, D]
    v = e @ x["W_V"]  # [T, D]
    for (token, branch), factor in AGREE.items():
        t = tokens.index(token)
        k[t, branch] = factor * x["h"][t, branch].detach()
    return k, v


def print_table(tokens: list[str], a: torch.Tensor, o: torch.Tensor) -> None:
    gate_cols = "".join(f"{f'a[g={g}]':>9}" for g in range(G))
    print(f"{'token':<10}{'bigram row':>11}{gate_cols}{'|o|':>9}  memory")
    for t, (token, row) in enumerate(zip(tokens, bigram_ids(tokens), strict=True)):
        gates = "".join(f"{a[t, g].item():9.4f}" for g in range(G))
        notes = [f"g={g}: key = {f:+.0f} h" for (tok, g), f in AGREE.items() if tok == token]
        print(f"{token:<10}{row:>11}{gates}{o[t].norm().item():9.4f}  {', '.join(notes) or 'random'}")


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2026)
    tokens = SENTENCE.split()
    x = {name: t.requires_grad_() for name, t in toy_inputs(tokens, gen).items()}
    block = RetrievalGate(D, num_branches=G)
    with torch.no_grad():  # weights near 1, as after some training
        block.w_q.add_(0.05 * torch.randn(G, D, generator=gen))
        block.w_k.add_(0.05 * torch.randn(G, D, generator=gen))

    k, v = retrieve(tokens, x)
    o, a = block(x["h"], k, v)  # the fused kernel, through the module
    o_fn, a_fn = retrieval_attention.gate(x["h"], k, v, block.w_q, block.w_k)  # the functional form
    o_ref, a_ref = reference.gate(x["h"], k, v, block.w_q, block.w_k)  # one PyTorch op at a time

    print(f'"{SENTENCE}": T={len(tokens)} tokens, G={G} branches, D={D}\n')
    print_table(tokens, a, o)
    same = torch.equal(o, o_fn) and torch.equal(a, a_fn)
    diff = max((o - o_ref).abs().max().item(), (a - a_ref).abs().max().item())
    print(f"\nmodule == functional: {same}; max |fused - reference| over o and a: {diff:.1e}")

    # A toy loss: pull every gated value towards the token's own hidden state.
    params = {**x, "w_q": block.w_q, "w_k": block.w_k}
    loss = (o - x["h"].detach()).square().mean()
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)  # k, v are shared
    loss_ref = (o_ref - x["h"].detach()).square().mean()
    grads_ref = torch.autograd.grad(loss_ref, list(params.values()))
    print(f"\ntoy loss {loss.item():.4f}; gradient norms:")
    for (name, _), g, g_ref in zip(params.items(), grads, grads_ref, strict=True):
        print(f"  {name:<6}{g.norm().item():10.4f}   (max |fused - reference| {(g - g_ref).abs().max().item():.1e})")


if __name__ == "__main__":
    main()
