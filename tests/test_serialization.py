"""Serialization of the modules (docs/api.md): state_dict, torch.save/torch.load and torch.export.

The modules round-trip through ``state_dict`` into a fresh module, through ``torch.save`` of the
whole module and of its state_dict (the latter loadable with ``weights_only=True``), and a model
built from them (NgramHashEmbedding -> RetrievalAttention -> Linear) exports with ``torch.export``
to an ExportedProgram that keeps the fused operators, runs, matches eager (forward and
gradients), takes dynamic batch and sequence sizes, and survives ``torch.export.save``/``load``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

from retrieval_attention import NgramHashEmbedding, RetrievalAttention, RetrievalGate

from tolerances import assert_agree

V, G, D = 80, 2, 16


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Moves every parameter off its initial value (the conv taps start at zero, the norms at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


def _gate(seed: int, dtype: torch.dtype) -> RetrievalGate:
    return _perturb(RetrievalGate(D, G, dtype=dtype), seed)


def _attention(short_conv: bool) -> Callable[[int, torch.dtype], RetrievalAttention]:
    def make(seed: int, dtype: torch.dtype) -> RetrievalAttention:
        torch.manual_seed(seed)
        return _perturb(RetrievalAttention(D, 24, G, short_conv=short_conv, dtype=dtype), seed)

    return make


def _embedding(seed: int, dtype: torch.dtype, lookup_seed: int = 0) -> NgramHashEmbedding:
    # The seed picks the hash multipliers (and the table's values): a fresh module hashes
    # differently until the state_dict brings the original's buffers. The primes (table sizes),
    # the token lookup and pad_id are the module's configuration, given to the constructor.
    lookup = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(lookup_seed))
    torch.manual_seed(seed)
    module = NgramHashEmbedding.from_seed(
        [61, 53], 2, 8, token_vocab_size=50, seed=seed, pad_id=3, lookup=lookup, dtype=dtype
    )
    return _perturb(module, seed)


MODULES = {
    "gate": _gate,
    "attention_conv": _attention(True),
    "attention_plain": _attention(False),
    "embedding": _embedding,
}


def _inputs(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(123)
    if name == "gate":
        return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 5, G, D), (3, 5, G, D), (3, 5, D)))
    if name == "embedding":
        return (torch.randint(0, V, (3, 11), generator=g),)
    return torch.randn(3, 11, G, D, generator=g).to(dtype), torch.randn(3, 11, 24, generator=g).to(dtype)


def _outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The module's outputs and the gradients of a loss on them, for every parameter."""
    out = module(*inputs)
    out = list(out) if isinstance(out, tuple) else [out]
    loss = sum(o.float().square().sum() for o in out)
    params = [p for p in module.parameters() if p.requires_grad]
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, params))


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for x, y in zip(actual, expected, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


CASES = [(name, dtype) for name in MODULES for dtype in (torch.float32, torch.bfloat16)]
CASE_IDS = [f"{name}-{str(dtype)[6:]}" for name, dtype in CASES]


@pytest.mark.parametrize("name, dtype", CASES, ids=CASE_IDS)
def test_state_dict_into_fresh_module(name: str, dtype: torch.dtype) -> None:
    original, fresh = MODULES[name](1, dtype), MODULES[name](2, dtype)
    inputs = _inputs(name, dtype)
    expected = _outputs(original, inputs)
    assert not torch.equal(_outputs(fresh, inputs)[0], expected[0]), "the fresh module should differ before loading"
    fresh.load_state_dict(original.state_dict(), strict=True)
    _assert_same(_outputs(fresh, inputs), expected)


@pytest.mark.parametrize("name, dtype", CASES, ids=CASE_IDS)
def test_save_and_load_whole_module(name: str, dtype: torch.dtype) -> None:
    original = MODULES[name](1, dtype)
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(original) and repr(loaded) == repr(original)
    inputs = _inputs(name, dtype)
    _assert_same(_outputs(loaded, inputs), _outputs(original, inputs))


@pytest.mark.parametrize("name, dtype", CASES, ids=CASE_IDS)
def test_state_dict_loads_with_weights_only(name: str, dtype: torch.dtype) -> None:
    original, fresh = MODULES[name](1, dtype), MODULES[name](2, dtype)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state.keys() == original.state_dict().keys()
    fresh.load_state_dict(state, strict=True)
    inputs = _inputs(name, dtype)
    _assert_same(_outputs(fresh, inputs), _outputs(original, inputs))


def test_embedding_state_dict_with_another_lookup() -> None:
    """The state_dict carries `lookup`; the pad token's compressed id, derived from it, should follow."""
    original = _embedding(1, torch.float32, lookup_seed=0)
    fresh = _embedding(2, torch.float32, lookup_seed=1)  # same vocabulary size, another compression
    fresh.load_state_dict(original.state_dict(), strict=True)
    assert torch.equal(fresh.lookup, original.lookup)
    inputs = _inputs("embedding", torch.float32)
    _assert_same(_outputs(fresh, inputs), _outputs(original, inputs))


def test_state_dict_keys() -> None:
    """The names a checkpoint holds: the hash tables are buffers, so they travel with it."""
    assert set(_gate(0, torch.float32).state_dict()) == {"w_q", "w_k"}
    assert set(_attention(True)(0, torch.float32).state_dict()) == {
        "kv_proj.weight",
        "kv_proj.bias",
        "gate.w_q",
        "gate.w_k",
        "short_conv.weight",
        "short_conv.norm_weight",
    }
    assert set(_embedding(0, torch.float32).state_dict()) == {
        "multipliers",
        "primes",
        "offsets",
        "lookup",
        "embedding.weight",
    }


# ---------------------------------------------------------------------------------------------
# torch.export


class Model(nn.Module):
    """Token ids and hidden states in, logits out: NgramHashEmbedding -> RetrievalAttention -> Linear."""

    def __init__(self, short_conv: bool) -> None:
        super().__init__()
        self.embedding = _embedding(3, torch.float32)
        torch.manual_seed(4)
        self.block = _perturb(RetrievalAttention(D, self.embedding.embed_size, G, short_conv=short_conv), 4)
        self.head = nn.Linear(D, 7)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(hidden, self.embedding(ids)))


def _model_inputs(B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randn(B, T, G, D, generator=g)


FUSED_OPS = {
    "retrieval_attention.gate.default",
    "retrieval_attention.ngram_hash.default",
    "retrieval_attention.linear.default",
    "retrieval_attention.lookup.default",
}


def _fused_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {
        str(node.target)
        for node in program.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("retrieval_attention.")
    }


def _forward_and_grads(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    y = module(*inputs)
    params = [p for _, p in sorted(module.named_parameters())]
    return [y.detach(), *torch.autograd.grad(y.square().sum(), params)]


@pytest.fixture(scope="module", params=[True, False], ids=["short_conv", "no_short_conv"])
def exported(request) -> tuple[Model, torch.export.ExportedProgram]:
    model = Model(short_conv=request.param)
    B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(
        model, _model_inputs(2, 9), dynamic_shapes={"ids": {0: B, 1: T}, "hidden": {0: B, 1: T}}
    )
    return model, program


def test_export_static_matches_eager() -> None:
    model = Model(short_conv=True)
    inputs = _model_inputs(2, 9)
    program = torch.export.export(model, inputs)
    assert _fused_ops(program) == FUSED_OPS | {"retrieval_attention.short_conv.default"}
    _assert_same(_forward_and_grads(program.module(), inputs), _forward_and_grads(model, inputs))


@pytest.mark.parametrize("B, T", [(2, 9), (1, 2), (3, 5), (4, 40)])
def test_export_dynamic_shapes_match_eager(exported, B: int, T: int) -> None:
    model, program = exported
    conv = {"retrieval_attention.short_conv.default"} if model.block.short_conv is not None else set()
    assert _fused_ops(program) == FUSED_OPS | conv
    inputs = _model_inputs(B, T, seed=B * 100 + T)
    _assert_same(_forward_and_grads(program.module(), inputs), _forward_and_grads(model, inputs))


def test_export_save_and_load(exported, tmp_path) -> None:
    model, program = exported
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert _fused_ops(loaded) == _fused_ops(program)
    for B, T in [(2, 9), (3, 17)]:
        inputs = _model_inputs(B, T, seed=T)
        _assert_same(_forward_and_grads(loaded.module(), inputs), _forward_and_grads(model, inputs))


def test_export_decomposed_keeps_the_fused_operators(exported) -> None:
    """run_decompositions lowers aten ops to core ATen; the custom operators stay whole."""
    model, program = exported
    decomposed = program.run_decompositions()
    assert _fused_ops(decomposed) == _fused_ops(program)
    inputs = _model_inputs(3, 10, seed=5)
    # The decompositions of aten ops (linear, rms_norm, ...) may round differently from eager.
    assert_agree(decomposed.module()(*inputs), model(*inputs), "logits")


def test_export_under_no_grad_saves_no_statistics() -> None:
    model = Model(short_conv=True)
    inputs = _model_inputs(2, 9)
    with torch.no_grad():
        program = torch.export.export(model, inputs)
        expected = model(*inputs)
    gates = [n for n in program.graph.nodes if str(n.target) == "retrieval_attention.gate.default"]
    assert len(gates) == 1 and gates[0].kwargs.get("save_stats") is False
    with torch.no_grad():
        assert torch.equal(program.module()(*inputs), expected)
