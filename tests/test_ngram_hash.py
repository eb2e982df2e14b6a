"""ngram_hash (docs/ngram.md) against the Engram demo's NumPy hashing; its tables; NgramHashEmbedding.

Also a hypothesis property against a NumPy implementation (exact), and every bad input, each once in a
child process (tests/bad_input.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

import retrieval_attention
from retrieval_attention import NgramHashEmbedding, functional, ngram_hash_tables, reference
from retrieval_attention.ngram import is_prime

import bad_input
from bad_input import BadCase
from conftest import DEVICE_NAMES, DEVICES, FUZZ_SETTINGS, NEEDS_CUDA

MERSENNE_61 = 2**61 - 1  # a prime near the top of int64: the modulo sees every bit of mix


def _demo_mix(x: np.ndarray, multipliers: np.ndarray, pad_id: int) -> list[np.ndarray]:
    """The demo's mix per order n = 2..max_n: shifted copies padded with pad_id, products, XOR."""
    T = x.shape[1]
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad_id)[:, :T] for k in range(1, len(multipliers))]
    mixes = []
    with np.errstate(over="ignore"):
        for n in range(2, len(multipliers) + 1):
            mix = shifts[0] * multipliers[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
            mixes.append(mix)
    return mixes


def _demo_hash(x: np.ndarray, multipliers: np.ndarray, primes: np.ndarray, pad_id: int) -> np.ndarray:
    """The demo's _get_ngram_hashes: [B, T, (max_n - 1) * H], order-major then head."""
    mixes = _demo_mix(x, multipliers, pad_id)
    heads = [mix % int(p) for mix, row in zip(mixes, primes, strict=True) for p in row]
    return np.stack(heads, axis=2).astype(np.int64)


def _small_primes(count: int, above: int) -> list[int]:
    primes, candidate = [], above
    while len(primes) < count:
        candidate += 1
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            primes.append(candidate)
    return primes


def _tables(max_n: int, H: int, big_prime: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(max_n * 100 + H)
    # Odd multipliers over the whole int64 range, so products wrap and mix takes both signs.
    multipliers = torch.randint(-(2**62), 2**62, (max_n,), generator=g, dtype=torch.int64) * 2 + 1
    primes = _small_primes((max_n - 1) * H, 1000)
    if big_prime:
        primes[-1] = MERSENNE_61
    return multipliers, torch.tensor(primes, dtype=torch.int64).view(max_n - 1, H)


# (max_n, H, B, T, highest id, pad_id)
CONFIGS = {
    "bigram_1head": (2, 1, 1, 1, 10, 0),
    "trigram_8heads": (3, 8, 2, 50, 2**40, 0),
    "4gram_8heads_pad": (4, 8, 3, 17, 2**40, 7),
    "short_T": (4, 1, 2, 2, 1000, 3),
    "small_ids_big_pad": (3, 2, 3, 9, 5, 2**40),
    "large_prime": (3, 8, 2, 33, 2**62, 1),
    "many_chunks": (3, 4, 4, 3000, 2**40, 2),  # more tokens than one parallel chunk
}


def _case(name: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    max_n, H, B, T, high, pad_id = CONFIGS[name]
    multipliers, primes = _tables(max_n, H, big_prime=name == "large_prime")
    ids = torch.randint(0, high, (B, T), dtype=torch.int64)
    return ids.to(device), multipliers.to(device), primes.to(device), pad_id


def _expected(ids: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, pad_id: int) -> torch.Tensor:
    return torch.from_numpy(_demo_hash(ids.cpu().numpy(), multipliers.cpu().numpy(), primes.cpu().numpy(), pad_id))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_demo(device: str, name: str) -> None:
    ids, multipliers, primes, pad_id = _case(name, device)
    out = functional.ngram_hash(ids, multipliers, primes, pad_id=pad_id)
    expected = _expected(ids, multipliers, primes, pad_id)
    assert out.dtype == torch.int64 and out.device == ids.device and out.is_contiguous()
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(reference.ngram_hash(ids, multipliers, primes, pad_id=pad_id).cpu(), expected)
    assert (out >= 0).all() and (out < primes.flatten()).all()


def test_products_wrap_to_negative_mix() -> None:
    ids, multipliers, _, pad_id = _case("trigram_8heads", "cpu")
    mixes = _demo_mix(ids.numpy(), multipliers.numpy(), pad_id)
    assert any((mix < 0).any() for mix in mixes), "the config should exercise the floor modulo of a negative mix"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_ids(device: str, layout: str) -> None:
    _, multipliers, primes, _ = _case("4gram_8heads_pad", device)
    base = torch.randint(0, 2**40, (6, 20), device=device)
    ids = base[::2, 1::3] if layout == "strided" else base.t()
    assert not ids.is_contiguous()
    out = functional.ngram_hash(ids, multipliers, primes, pad_id=5)
    assert torch.equal(out.cpu(), _expected(ids, multipliers, primes, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, T", [(0, 5), (3, 0), (0, 0)])
def test_empty(device: str, B: int, T: int) -> None:
    _, multipliers, primes, _ = _case("trigram_8heads", device)
    ids = torch.zeros(B, T, dtype=torch.int64, device=device)
    out = functional.ngram_hash(ids, multipliers, primes, pad_id=0)
    assert out.shape == (B, T, 16) and out.dtype == torch.int64
    assert reference.ngram_hash(ids, multipliers, primes, pad_id=0).shape == (B, T, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    ids, multipliers, primes, pad_id = _case("4gram_8heads_pad", device)
    torch.library.opcheck(
        torch.ops.retrieval_attention.ngram_hash.default, (ids, multipliers, primes), {"pad_id": pad_id}
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device: str) -> None:
    torch._dynamo.reset()
    ids, multipliers, primes, pad_id = _case("trigram_8heads", device)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return functional.ngram_hash(ids, multipliers, primes, pad_id=pad_id) + 1

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(ids).cpu(), _expected(ids, multipliers, primes, pad_id) + 1)


def _bad(**changes) -> dict:
    args = {
        "ids": torch.randint(0, 100, (2, 5)),
        "multipliers": torch.tensor([3, 5, 7]),
        "primes": torch.tensor([[11, 13], [17, 19]]),
        "pad_id": 0,
    }
    return {**args, **changes}


BAD_INPUTS = {
    "ids_rank": (_bad(ids=torch.zeros(5, dtype=torch.int64)), "`ids`", ValueError),
    "ids_dtype": (_bad(ids=torch.zeros(2, 5, dtype=torch.int32)), "`ids`", TypeError),
    "ids_negative": (_bad(ids=torch.tensor([[1, 2, -3, 4]])), "`ids`", ValueError),
    "multipliers_rank": (_bad(multipliers=torch.ones(3, 1, dtype=torch.int64)), "`multipliers`", ValueError),
    "multipliers_dtype": (_bad(multipliers=torch.ones(3)), "`multipliers`", TypeError),
    "max_n_1": (
        _bad(multipliers=torch.tensor([3]), primes=torch.ones(0, 2, dtype=torch.int64)),
        "`multipliers`",
        ValueError,
    ),
    "primes_rows": (_bad(primes=torch.tensor([[11, 13]])), "`primes`", ValueError),
    "primes_rank": (_bad(primes=torch.tensor([11, 13])), "`primes`", ValueError),
    "primes_no_heads": (_bad(primes=torch.ones(2, 0, dtype=torch.int64)), "`primes`", ValueError),
    "primes_dtype": (_bad(primes=torch.ones(2, 2, dtype=torch.int32)), "`primes`", TypeError),
    "primes_zero": (_bad(primes=torch.tensor([[11, 13], [0, 19]])), "`primes`", ValueError),
    "primes_negative": (_bad(primes=torch.tensor([[11, -13], [17, 19]])), "`primes`", ValueError),
    "pad_id_negative": (_bad(pad_id=-1), "`pad_id`", ValueError),
}


def _ngram_call(args: dict, via: str = "functional"):
    def build() -> tuple:
        positional = tuple(args[name].clone() for name in ("ids", "multipliers", "primes"))
        fn = torch.ops.retrieval_attention.ngram_hash if via == "op" else functional.ngram_hash
        packed = {"cu_seqlens": args["cu_seqlens"]} if "cu_seqlens" in args else {}
        return fn, positional, {"pad_id": args["pad_id"], **packed}

    return build


def _late_negative_ids() -> torch.Tensor:
    """Many parallel chunks of ids, the very last id negative."""
    ids = torch.randint(0, 2**40, (4, 3000), generator=torch.Generator().manual_seed(0))
    ids[3, 2999] = -(2**62)
    return ids


MORE_BAD_INPUTS = {
    "ids_float": (_bad(ids=torch.zeros(2, 5)), "`ids`", TypeError),
    "ids_uint8": (_bad(ids=torch.zeros(2, 5, dtype=torch.uint8)), "`ids`", TypeError),
    "ids_rank3": (_bad(ids=torch.zeros(2, 5, 1, dtype=torch.int64)), "`ids`", ValueError),
    "ids_negative_strided": (_bad(ids=-torch.ones(6, 10, dtype=torch.int64)[::2, ::3]), "`ids`", ValueError),
    "multipliers_int32": (_bad(multipliers=torch.tensor([3, 5, 7], dtype=torch.int32)), "`multipliers`", TypeError),
    "multipliers_too_many": (_bad(multipliers=torch.tensor([3, 5, 7, 9])), "`primes`", ValueError),
    "primes_float": (_bad(primes=torch.ones(2, 2)), "`primes`", TypeError),
    "primes_last_negative": (_bad(primes=torch.tensor([[11, 13], [17, -(2**62)]])), "`primes`", ValueError),
    "primes_all_zero": (_bad(primes=torch.zeros(2, 2, dtype=torch.int64)), "`primes`", ValueError),
    "pad_id_very_negative": (_bad(pad_id=-(2**63)), "`pad_id`", ValueError),
    "cu_seqlens_float": (
        _bad(ids=torch.zeros(1, 5, dtype=torch.int64), cu_seqlens=torch.tensor([0.0, 5.0])),
        "`cu_seqlens`",
        TypeError,
    ),
    "cu_seqlens_rank2": (
        _bad(ids=torch.zeros(1, 5, dtype=torch.int64), cu_seqlens=torch.tensor([[0, 5]])),
        "`cu_seqlens`",
        ValueError,
    ),
    "cu_seqlens_short_of_T": (
        _bad(ids=torch.zeros(1, 5, dtype=torch.int64), cu_seqlens=torch.tensor([0, 2, 4])),
        "`cu_seqlens` to start at 0 and end at T = 5",
        ValueError,
    ),
    "cu_seqlens_decreasing": (
        _bad(ids=torch.zeros(1, 5, dtype=torch.int64), cu_seqlens=torch.tensor([0, 4, 2, 5])),
        "`cu_seqlens` never to decrease",
        ValueError,
    ),
    "cu_seqlens_with_two_rows": (_bad(cu_seqlens=torch.tensor([0, 5])), "`ids` of shape [1, T]", ValueError),
}


def _embedding_negative_id() -> tuple:
    module = NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=50)
    return module, (torch.tensor([[3, 4, -1, 5]]),), {}


def _cuda_call(on_cpu: str | None, negate_primes: bool = False):
    """Every tensor on the GPU but ``on_cpu``; or bad primes on the GPU."""

    def build() -> tuple:
        args = {n: t if n == on_cpu or not isinstance(t, torch.Tensor) else t.cuda() for n, t in _bad().items()}
        primes = -args["primes"] if negate_primes else args["primes"]
        return functional.ngram_hash, (args["ids"], args["multipliers"], primes), {"pad_id": 0}

    return build


CASES: dict[str, BadCase] = {
    **bad_input.named(BAD_INPUTS, _ngram_call, "ngram"),
    **bad_input.named(BAD_INPUTS, _ngram_call, "ngram_op", via="op"),
    **bad_input.named(MORE_BAD_INPUTS, _ngram_call, "ngram"),
    "ngram-ids_negative_last_of_many_chunks": BadCase(
        _ngram_call(_bad(ids=_late_negative_ids())), ValueError, r"`ids`.*got -4611686018427387904"
    ),
    "embedding-negative_id": BadCase(_embedding_negative_id, ValueError, "`ids`"),
    **{
        f"cuda_devices-{name}": BadCase(_cuda_call(name), RuntimeError, f"`{name}`", cuda=True)
        for name in ("ids", "multipliers", "primes")
    },
    "cuda-primes_negative": BadCase(_cuda_call(None, negate_primes=True), ValueError, "`primes`", cuda=True),
}


def _packed(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of lengths 5, 1, 0 (empty), 2 and 7 packed in one row, and their offsets."""
    lengths = [5, 1, 0, 2, 7]
    ids = torch.randint(0, 2**40, (1, sum(lengths)), generator=torch.Generator().manual_seed(3)).to(device)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=dtype, device=device)
    return ids, cu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_packed_equals_each_sequence_alone(device: str, dtype: torch.dtype) -> None:
    """No n-gram crosses a boundary: each packed sequence hashes as it would alone, bit for bit."""
    multipliers, primes = (t.to(device) for t in _tables(4, 3, big_prime=True))
    ids, cu = _packed(device, dtype)
    out = functional.ngram_hash(ids, multipliers, primes, pad_id=7, cu_seqlens=cu)
    bounds = cu.tolist()
    alone = [functional.ngram_hash(ids[:, a:b], multipliers, primes, pad_id=7) for a, b in itertools.pairwise(bounds)]
    assert torch.equal(out, torch.cat(alone, dim=1))
    assert torch.equal(out, reference.ngram_hash(ids, multipliers, primes, pad_id=7, cu_seqlens=cu))
    # One sequence is the unpacked call; the boundaries do change the result.
    whole = functional.ngram_hash(ids, multipliers, primes, pad_id=7)
    one = torch.tensor([0, ids.shape[1]], dtype=dtype, device=device)
    assert torch.equal(functional.ngram_hash(ids, multipliers, primes, pad_id=7, cu_seqlens=one), whole)
    assert not torch.equal(out, whole)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_packed_equals_each_sequence_alone(device: str) -> None:
    module = NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=2**40, device=device)
    ids, cu = _packed(device, torch.int64)
    bounds = cu.tolist()
    alone = torch.cat([module(ids[:, a:b]) for a, b in itertools.pairwise(bounds)], dim=1)
    assert torch.equal(module(ids, cu_seqlens=cu), alone)


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)


@NEEDS_CUDA
def test_cuda_does_not_check_for_negative_ids() -> None:
    """Negative ids are not looked for on CUDA; they hash as NumPy's wrapping arithmetic does."""
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _bad().items()}
    ids = -torch.randint(1, 2**40, (2, 9), device="cuda")
    out = functional.ngram_hash(ids, args["multipliers"], args["primes"], pad_id=0)
    assert torch.equal(out.cpu(), _expected(ids, args["multipliers"], args["primes"], 0))


def _trial_division_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def test_is_prime() -> None:
    assert [n for n in range(5000) if is_prime(n)] == [n for n in range(5000) if _trial_division_prime(n)]
    assert is_prime(MERSENNE_61) and is_prime(2**64 - 59)
    # Carmichael and strong pseudoprimes to the first prime bases.
    for composite in (561, 2047, 3215031751, 3825123056546413051, 2**64 - 1, MERSENNE_61 * 3):
        assert not is_prime(composite)


def _demo_tables(vocab_sizes, H, token_vocab_size, layer_ids, seed):
    """The demo's NgramHashMapping tables, written out with trial division."""
    half_bound = max(1, (np.iinfo(np.int64).max // token_vocab_size) // 2)
    seen, out = set(), {}
    for layer_id in layer_ids:
        r = np.random.default_rng(seed + 10007 * layer_id).integers(0, half_bound, size=(len(vocab_sizes) + 1,))
        primes = []
        for V in vocab_sizes:
            start = V - 1
            for _ in range(H):
                candidate = start + 1
                while not _trial_division_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                primes.append(candidate)
                start = candidate
        out[layer_id] = (r.astype(np.int64) * 2 + 1, np.array(primes).reshape(len(vocab_sizes), H))
    return out


@pytest.mark.parametrize(
    "vocab_sizes, H, token_vocab_size, layer_ids, table_seed",
    [([20000, 20000], 8, 129280, (1, 15), 0), ([1000, 500, 300], 2, 50000, (0, 3, 7), 42), ([7], 1, 10, (0,), 1)],
)
def test_tables_reproduce_demo(vocab_sizes, H, token_vocab_size, layer_ids, table_seed) -> None:
    tables = ngram_hash_tables(vocab_sizes, H, token_vocab_size=token_vocab_size, layer_ids=layer_ids, seed=table_seed)
    expected = _demo_tables(vocab_sizes, H, token_vocab_size, layer_ids, table_seed)
    assert list(tables) == list(layer_ids)
    all_primes = []
    for layer_id, (multipliers, primes) in tables.items():
        assert multipliers.dtype == torch.int64 and multipliers.shape == (len(vocab_sizes) + 1,)
        assert primes.dtype == torch.int64 and primes.shape == (len(vocab_sizes), H)
        assert torch.equal(multipliers, torch.from_numpy(expected[layer_id][0]))
        assert torch.equal(primes, torch.from_numpy(expected[layer_id][1]))
        assert (multipliers % 2 == 1).all()
        assert (primes >= torch.tensor(vocab_sizes)[:, None]).all()
        all_primes += primes.flatten().tolist()
    assert len(set(all_primes)) == len(all_primes)


def test_tables_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layer_ids"):
        ngram_hash_tables([100], 2, token_vocab_size=10, layer_ids=(1, 1))
    with pytest.raises(ValueError, match="num_heads"):
        ngram_hash_tables([100], 0, token_vocab_size=10)


def _hand_embedding(module: NgramHashEmbedding, ids: torch.Tensor, lookup: torch.Tensor | None, pad_id: int):
    """Each head's row of the table, fetched one head at a time with the demo's hashes."""
    x = ids.cpu().numpy()
    if lookup is not None:
        x, pad_id = lookup.numpy()[x], int(lookup[pad_id])
    primes = module.primes.cpu().numpy()
    hashes = _demo_hash(x, module.multipliers.cpu().numpy(), primes, pad_id)
    weight = module.embedding.weight.detach().cpu()
    offset, heads = 0, []
    for h, size in enumerate(primes.flatten().tolist()):
        heads.append(weight[torch.from_numpy(hashes[..., h]) + offset])
        offset += size
    return torch.cat(heads, dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_lookup", [False, True])
def test_embedding_matches_hand_lookup(device: str, with_lookup: bool) -> None:
    V, pad_id = 300, 4
    lookup = torch.randint(0, 120, (V,)) if with_lookup else None
    module = NgramHashEmbedding.from_seed(
        [97, 61], 4, 32, token_vocab_size=120, seed=3, layer_id=2, layer_ids=(0, 2), pad_id=pad_id, lookup=lookup
    ).to(device)
    assert module.embed_size == 64 and module.max_n == 3 and module.num_heads == 4
    assert module.embedding.weight.shape == (int(module.primes.sum()), 8)
    assert "embedding.weight" in module.state_dict()
    tables = ngram_hash_tables([97, 61], 4, token_vocab_size=120, layer_ids=(0, 2), seed=3)
    assert torch.equal(module.primes.cpu(), tables[2][1]) and torch.equal(module.multipliers.cpu(), tables[2][0])
    ids = torch.randint(0, V, (3, 11), device=device)
    e = module(ids)
    assert e.shape == (3, 11, module.embed_size)
    assert torch.equal(e.detach().cpu(), _hand_embedding(module, ids, lookup, pad_id))
    assert module.hash(ids).shape == (3, 11, 8)


def test_embedding_sparse_grad() -> None:
    module = NgramHashEmbedding.from_seed([50], 2, 8, token_vocab_size=100, sparse=True)
    module(torch.randint(0, 100, (2, 6))).sum().backward()
    assert module.embedding.weight.grad.is_sparse


def test_embedding_rejects_indivisible_dim() -> None:
    with pytest.raises(ValueError, match="embed_dim_per_ngram"):
        NgramHashEmbedding.from_seed([50, 50], 3, 8, token_vocab_size=100)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_compile_fullgraph(device: str) -> None:
    torch._dynamo.reset()
    module = NgramHashEmbedding.from_seed([97, 61, 31], 2, 16, token_vocab_size=100, lookup=torch.arange(100)).to(
        device
    )
    ids = torch.randint(0, 100, (2, 13), device=device)
    assert torch.equal(torch.compile(module, fullgraph=True)(ids), module(ids))


def test_exported() -> None:
    for name in ("ngram_hash", "NgramHashEmbedding", "ngram_hash_tables"):
        assert name in retrieval_attention.__all__ and hasattr(retrieval_attention, name)


# The property: ngram_hash against NumPy, exactly, over drawn tables, ids, layouts and devices.


def numpy_ngram_hash(ids: np.ndarray, multipliers: np.ndarray, primes: np.ndarray, pad_id: int) -> np.ndarray:
    """docs/ngram.md written out: mix_t(n) = XOR_{i < n} x_{t-i} * m_i (pad_id before the start, int64
    products wrapping around), idx = mix mod P(n, j) with the floor modulo of NumPy's ``%``."""
    B, T = ids.shape
    max_n, H = len(multipliers), primes.shape[1]
    padded = np.concatenate([np.full((B, max_n - 1), pad_id, dtype=np.int64), ids], axis=1)
    out = np.empty((B, T, (max_n - 1) * H), dtype=np.int64)
    mix = ids * multipliers[0]  # arrays of int64 wrap around silently
    for n in range(2, max_n + 1):
        i = n - 1
        shifted = padded[:, max_n - 1 - i : max_n - 1 - i + T]  # x_{t-i}
        mix = np.bitwise_xor(mix, shifted * multipliers[i])
        for j in range(H):
            out[:, :, (n - 2) * H + j] = mix % primes[n - 2, j]
    return out


INT64_MAX = 2**63 - 1
NGRAM_MIN_EXAMPLES = 500


@st.composite
def ngram_examples(draw) -> dict:
    max_n = draw(st.integers(2, 5))
    H = draw(st.integers(1, 8))
    return {
        "B": draw(st.integers(0, 4)),
        "T": draw(st.integers(0, 300)),
        # Odd, anywhere in int64 (negative ones too), so the products wrap and mix takes both signs.
        "multipliers": draw(
            st.lists(st.integers(-(2**63), INT64_MAX).map(lambda m: m | 1), min_size=max_n, max_size=max_n)
        ),
        # Positive; neither prime nor distinct is required by the operator. Small ones and ones near 2^63.
        "primes": draw(
            st.lists(
                st.integers(1, 100) | st.integers(1, INT64_MAX) | st.integers(INT64_MAX - 1000, INT64_MAX),
                min_size=(max_n - 1) * H,
                max_size=(max_n - 1) * H,
            )
        ),
        "H": H,
        "id_high": draw(st.sampled_from([1, 2, 1000, 2**31, 2**40, 2**62])),
        "pad_id": draw(st.integers(0, 10) | st.integers(0, INT64_MAX)),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "strided", "offset", "expanded"])),
        "device": draw(st.sampled_from(DEVICE_NAMES)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _ngram_ids(ex: dict) -> torch.Tensor:
    gen = torch.Generator().manual_seed(ex["seed"])
    B, T, layout = ex["B"], ex["T"], ex["layout"]

    def randint(*shape: int) -> torch.Tensor:
        return torch.randint(0, ex["id_high"], shape, generator=gen, dtype=torch.int64).to(ex["device"])

    if layout == "transposed":
        return randint(T, B).t()
    if layout == "strided":
        return randint(2 * B, 3 * T)[::2, 1::3]
    if layout == "offset":
        return randint(B * T + 1)[1:].view(B, T)
    if layout == "expanded":
        return randint(1, T).expand(B, T)
    return randint(B, T)


# Its examples cost ~1 ms, so it gets more than the profile's count in CI.
@settings(FUZZ_SETTINGS, max_examples=max(FUZZ_SETTINGS.max_examples, NGRAM_MIN_EXAMPLES))
@given(ex=ngram_examples())
def test_ngram_hash_property(ex: dict) -> None:
    ids = _ngram_ids(ex)
    device = ex["device"]
    multipliers = torch.tensor(ex["multipliers"], dtype=torch.int64, device=device)
    primes = torch.tensor(ex["primes"], dtype=torch.int64, device=device).view(-1, ex["H"])
    out = retrieval_attention.ngram_hash(ids, multipliers, primes, pad_id=ex["pad_id"])
    expected = numpy_ngram_hash(ids.cpu().numpy(), multipliers.cpu().numpy(), primes.cpu().numpy(), ex["pad_id"])
    assert out.dtype == torch.int64 and out.device == ids.device and out.is_contiguous()
    assert out.shape == (ex["B"], ex["T"], primes.numel())
    assert torch.equal(out.cpu(), torch.from_numpy(expected))
