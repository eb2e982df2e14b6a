"""Hashed n-gram embeddings (docs/ngram.md): the demo's hash tables and the embedding module.

``ngram_hash_tables`` derives the multipliers and primes of the official Engram demo's
``NgramHashMapping`` from a seed; ``NgramHashEmbedding`` hashes token ids with the fused
``ngram_hash`` operator and looks the hashes up in one concatenated table, as the demo's
``MultiHeadEmbedding``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import sharding as _sharding
from .functional import ngram_hash
from .host_table import HostTable, Request

# Miller–Rabin with these bases is exact for every n < 3.3e24, so for every int64.
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
# The demo seeds layer l's multipliers with seed + _LAYER_SEED_STRIDE * l.
_LAYER_SEED_STRIDE = 10007


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime: deterministic Miller–Rabin, exact for every 64-bit ``n``."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unseen_prime(start: int, seen: set[int]) -> int:
    candidate = start + 1
    while not is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate


def ngram_hash_tables(
    vocab_sizes: Sequence[int],
    num_heads: int,
    *,
    token_vocab_size: int,
    layer_ids: Sequence[int] = (0,),
    seed: int = 0,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The multipliers and primes of the demo's ``NgramHashMapping``, bit for bit.

    Args:
        vocab_sizes: the table size per order, ``[max_n - 1]`` (orders 2..max_n); each order's
            primes are the next ones above its size.
        num_heads: ``H``, hash heads per order.
        token_vocab_size: the number of (compressed) token ids; bounds the multipliers so that
            ``id * multiplier`` stays in int64 for valid ids.
        layer_ids: the layers, in the demo's order: primes are distinct across all of them.
        seed: the demo's ``seed``; layer ``l`` draws from ``numpy.random.default_rng(seed + 10007 * l)``.

    Returns:
        For each layer id, ``(multipliers [max_n], primes [max_n - 1, H])``, both int64 on the CPU.
    """
    try:
        import numpy as np
    except ImportError as error:  # pragma: no cover - numpy is a test requirement
        raise ImportError(
            "retrieval_attention.ngram_hash_tables needs numpy (its random generator defines the multipliers)"
        ) from error
    if len(vocab_sizes) < 1 or any(v < 1 for v in vocab_sizes):
        raise ValueError(f"ngram_hash_tables: expected at least one vocab size, each >= 1, but got {vocab_sizes}")
    if num_heads < 1:
        raise ValueError(f"ngram_hash_tables: expected num_heads >= 1, but got {num_heads}")
    if token_vocab_size < 1:
        raise ValueError(f"ngram_hash_tables: expected token_vocab_size >= 1, but got {token_vocab_size}")
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"ngram_hash_tables: expected distinct layer_ids, but got {layer_ids}")
    max_n = len(vocab_sizes) + 1
    half_bound = max(1, (np.iinfo(np.int64).max // token_vocab_size) // 2)
    seen: set[int] = set()
    tables = {}
    for layer_id in layer_ids:
        rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer_id)
        multipliers = rng.integers(low=0, high=half_bound, size=(max_n,), dtype=np.int64) * 2 + 1
        primes = []
        for vocab_size in vocab_sizes:
            start = vocab_size - 1
            for _ in range(num_heads):
                start = _next_unseen_prime(start, seen)
                seen.add(start)
                primes.append(start)
        tables[layer_id] = (
            torch.from_numpy(multipliers),
            torch.tensor(primes, dtype=torch.int64).view(max_n - 1, num_heads),
        )
    return tables


def _refresh_pad_id_hook(module: NgramHashEmbedding, incompatible_keys: object) -> None:
    module._refresh_pad_id()  # a module-level function, so that the module pickles


class NgramHashEmbedding(nn.Module):
    """Token ids in, retrieved n-gram embeddings out: the demo's hashing and ``MultiHeadEmbedding``.

    Each of the ``(max_n - 1) * H`` heads owns ``primes[n - 2, j]`` rows of one table
    ``embedding.weight`` ``[sum(primes), embed_dim_per_ngram // H]``; a token's embedding is its
    heads' rows concatenated.

    Args:
        multipliers: ``[max_n]`` int64, odd, ``max_n >= 2``.
        primes: ``[max_n - 1, H]`` int64, distinct primes (the heads' table sizes).
        embed_dim_per_ngram: embedding size of one order, split over its ``H`` heads (divisible by H).
        pad_id: the token before the start of every sequence, in the original token space (mapped
            through ``lookup`` when given, as the demo does).
        lookup: ``[V]`` int64 token compression, applied to the ids before hashing; None for none.
        sparse: sparse gradients for the table (``nn.Embedding(sparse=True)``).
        device, dtype: of the table; the int64 buffers go to ``device`` too (with ``host_table``, only they do).
        process_group: shard the table's rows over this group (docs/ngram.md#sharding): this
            rank's ``embedding.weight`` holds its block of rows only, ``state_dict()`` presents it
            as a DTensor sharded by rows, and a lookup exchanges rows with the other ranks. Every
            rank must construct the module alike and call it as often. None: the whole table here.
        host_table: keep ``embedding.weight`` in host memory, while the buffers and the outputs are on
            ``device``, the compute device; ``module.to(...)`` moves the buffers and leaves the table on
            the host (dtype changes still apply). Lookups gather the rows on the host into pinned
            buffers; :meth:`prefetch` starts one ahead of the forward (docs/ngram.md#host-tables).
            Not with ``process_group``.

    Buffers: ``multipliers`` ``[max_n]``, ``primes`` ``[max_n - 1, H]``, ``offsets``
    ``[(max_n - 1) * H]`` (each head's first row in the table), ``lookup`` ``[V]`` or None.
    Shapes: ``forward(ids [B, T] int64) -> [B, T, embed_size]`` with
    ``embed_size = (max_n - 1) * embed_dim_per_ngram``.
    """

    def __init__(
        self,
        multipliers: torch.Tensor,
        primes: torch.Tensor,
        embed_dim_per_ngram: int,
        *,
        pad_id: int = 0,
        lookup: torch.Tensor | None = None,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
        host_table: bool = False,
    ) -> None:
        super().__init__()
        if host_table and process_group is not None:
            raise ValueError(
                "NgramHashEmbedding: expected `host_table=False` with `process_group` (a sharded table lives on "
                "the ranks' devices), but got host_table=True"
            )
        if multipliers.dim() != 1 or multipliers.shape[0] < 2:
            raise ValueError(f"NgramHashEmbedding: expected `multipliers` [max_n], max_n >= 2, got {multipliers.shape}")
        self.max_n = multipliers.shape[0]
        if primes.dim() != 2 or primes.shape[0] != self.max_n - 1 or primes.shape[1] < 1:
            raise ValueError(f"NgramHashEmbedding: expected `primes` [{self.max_n - 1}, H], got {primes.shape}")
        self.num_heads = primes.shape[1]
        if embed_dim_per_ngram < 1 or embed_dim_per_ngram % self.num_heads != 0:
            raise ValueError(
                f"NgramHashEmbedding: expected `embed_dim_per_ngram` a positive multiple of the heads "
                f"H = {self.num_heads}, but got {embed_dim_per_ngram}"
            )
        self.embed_dim_per_ngram = embed_dim_per_ngram
        self.embed_size = (self.max_n - 1) * embed_dim_per_ngram
        if pad_id < 0:
            raise ValueError(f"NgramHashEmbedding: expected `pad_id` >= 0, but got {pad_id}")
        if lookup is not None and (lookup.dim() != 1 or pad_id >= lookup.shape[0]):
            raise ValueError(
                f"NgramHashEmbedding: expected `lookup` [V] and 0 <= pad_id < V, got {list(lookup.shape)}, {pad_id}"
            )
        self.pad_id = pad_id  # in the original token space; hash_pad_id is its compressed id

        def int64(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=torch.int64).clone()

        self.register_buffer("multipliers", int64(multipliers))
        self.register_buffer("primes", int64(primes))
        sizes = self.primes.flatten()
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        self.register_buffer("lookup", None if lookup is None else int64(lookup))
        self._refresh_pad_id()
        # A loaded state_dict may carry another lookup: the compressed pad id follows it.
        self.register_load_state_dict_post_hook(_refresh_pad_id_hook)
        rows, dim = int(sizes.sum()), embed_dim_per_ngram // self.num_heads
        self.sharding = None if process_group is None else _sharding.row_sharding(rows, process_group)
        local_rows = rows if self.sharding is None else self.sharding.local_rows
        self.host_table = host_table
        self._host = HostTable() if host_table else None
        table_device = "cpu" if host_table else device
        self.embedding = _Embedding(local_rows, dim, sparse=sparse, device=table_device, dtype=dtype)
        if self.sharding is not None:
            self._shard(rows, dim, sparse)

    def _shard(self, rows: int, dim: int, sparse: bool) -> None:
        """Check that the ranks agree, and present the weight as a DTensor in state dicts."""
        facts = {
            "table shape": (rows, dim),
            "multipliers": self.multipliers.tolist(),
            "primes": self.primes.tolist(),
            "pad_id": self.pad_id,
            "lookup": None if self.lookup is None else hash(tuple(self.lookup.tolist())),
            "dtype": str(self.embedding.weight.dtype),
            "sparse": sparse,
        }
        _sharding.agree(self.sharding, facts, "NgramHashEmbedding")
        from torch.distributed.device_mesh import DeviceMesh

        self._mesh = DeviceMesh.from_group(self.sharding.group, self.embedding.weight.device.type)
        self._full_shape = torch.Size((rows, dim))
        self.register_state_dict_post_hook(_sharded_state_dict_hook)
        self.register_load_state_dict_pre_hook(_sharded_load_hook)

    def sharded_weight(self) -> torch.Tensor:
        """``embedding.weight`` as a DTensor ``[rows, dim]`` sharded by rows over the group's mesh (shares storage)."""
        from torch.distributed.tensor import DTensor, Shard

        local = self.embedding.weight.detach()
        return DTensor.from_local(
            local, self._mesh, [Shard(0)], run_check=False, shape=self._full_shape, stride=(self._full_shape[1], 1)
        )

    @classmethod
    def from_seed(
        cls,
        vocab_sizes: Sequence[int],
        num_heads: int,
        embed_dim_per_ngram: int,
        *,
        token_vocab_size: int,
        seed: int = 0,
        layer_id: int = 0,
        layer_ids: Sequence[int] | None = None,
        pad_id: int = 0,
        lookup: torch.Tensor | None = None,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
        host_table: bool = False,
    ) -> NgramHashEmbedding:
        """The module of layer ``layer_id`` with the demo's tables (see :func:`ngram_hash_tables`).

        ``layer_ids`` are all the layers the demo derives tables for (their primes are distinct,
        so they matter); None means ``(layer_id,)``. ``max_n = len(vocab_sizes) + 1``.
        """
        layer_ids = (layer_id,) if layer_ids is None else tuple(layer_ids)
        if layer_id not in layer_ids:
            raise ValueError(f"NgramHashEmbedding.from_seed: expected `layer_id` in {layer_ids}, but got {layer_id}")
        tables = ngram_hash_tables(
            vocab_sizes, num_heads, token_vocab_size=token_vocab_size, layer_ids=layer_ids, seed=seed
        )
        multipliers, primes = tables[layer_id]
        return cls(
            multipliers,
            primes,
            embed_dim_per_ngram,
            pad_id=pad_id,
            lookup=lookup,
            sparse=sparse,
            device=device,
            dtype=dtype,
            process_group=process_group,
            host_table=host_table,
        )

    def _refresh_pad_id(self) -> None:
        # Read once here, not per call: int() of a device tensor would sync and break torch.compile graphs.
        self.hash_pad_id = self.pad_id if self.lookup is None else int(self.lookup[self.pad_id])
        if self.hash_pad_id < 0:
            raise ValueError(f"NgramHashEmbedding: expected `lookup[pad_id]` >= 0, but got {self.hash_pad_id}")

    def hash(self, ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Raw hashes ``[B, T, (max_n - 1) * H]`` int64 of token ids ``[B, T]`` (after ``lookup``)."""
        if self.lookup is not None:
            # index_select rejects negative ids where indexing would wrap them around.
            ids = torch.index_select(self.lookup, 0, ids.flatten()).view(ids.shape)
        return ngram_hash(ids, self.multipliers, self.primes, pad_id=self.hash_pad_id, cu_seqlens=cu_seqlens)

    def to_fp8(self, block: int = 32, *, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        """An inference copy with the table in FP8 e4m3 and UE8M0 scales per ``block`` columns
        (``retrieval_attention.fp8.Fp8NgramHashEmbedding``, docs/ngram.md#fp8-tables); output in ``dtype``."""
        from .fp8 import Fp8NgramHashEmbedding  # fp8 imports this module

        return Fp8NgramHashEmbedding(self, block=block, dtype=dtype)

    def forward(
        self, ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings ``[B, T, embed_size]`` of token ids ``[B, T]`` int64.

        ``cu_seqlens`` ``[S + 1]``: sequences packed in one row (``ids`` ``[1, T]``), as
        :func:`retrieval_attention.ngram_hash` takes them; each is looked up as it would be alone.
        ``history`` ``[B, max_n - 1]``: the ids (in the id space of ``ids``) just before ``ids[:, 0]``,
        for decoding a token at a time; ``pad_id`` where the sequence had not started. None: the
        sequences start at ``ids[:, 0]``.
        """
        if self.host_table:
            return self._host_forward(ids, cu_seqlens, history)
        drop = 0  # leading positions of ids that are history: hashed, not looked up
        if history is not None:
            ids, drop = self._with_history(ids, history, cu_seqlens), history.shape[1]
        if self.sharding is not None:
            return self._sharded_forward(ids, cu_seqlens, drop)
        return self.embedding(self.hash(ids, cu_seqlens=cu_seqlens)[:, drop:] + self.offsets).flatten(-2)

    def prefetch(
        self, ids: torch.Tensor, *, history: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> None:
        """Start the lookup of ``forward(ids, history=history, cu_seqlens=cu_seqlens)`` now (``host_table`` only).

        The hashing and the host gather run on a worker thread and, on CUDA, the copy to the device
        on a side stream; the next ``forward`` with these same tensor objects, unmodified since, and
        the table not updated since, waits for it instead of doing the work. Any other forward
        drops it and looks up its own ids. Arguments as ``forward``'s: ``ids`` ``[B, T]`` int64 on the
        host or the compute device, ``history`` ``[B, max_n - 1]``, ``cu_seqlens`` ``[S + 1]``. An error
        found while prefetching (a negative id, bad offsets) is raised by the forward that uses it.
        """
        if not self.host_table:
            raise RuntimeError(
                "NgramHashEmbedding.prefetch: expected a module built with `host_table=True`, but got host_table=False"
            )
        self._check_host_request(ids, history, cu_seqlens, "prefetch")
        self._host.prefetch(self, Request(ids, history, cu_seqlens))

    @torch.compiler.disable  # worker threads and side streams: the model around it still compiles
    def _host_forward(
        self, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, history: torch.Tensor | None
    ) -> torch.Tensor:
        self._check_host_request(ids, history, cu_seqlens, "forward")
        return self._host.lookup(self, Request(ids, history, cu_seqlens)).flatten(-2)

    def _check_host_request(
        self, ids: torch.Tensor, history: torch.Tensor | None, cu_seqlens: torch.Tensor | None, where: str
    ) -> None:
        """Errors that name the argument, before anything starts: the host table's lookups hash on the host."""
        name = f"NgramHashEmbedding.{where}"
        devices = {torch.device("cpu"), self.offsets.device}
        places = " or ".join(sorted(str(d) for d in devices))
        for arg, t in (("ids", ids), ("history", history), ("cu_seqlens", cu_seqlens)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected `{arg}` a tensor, but got {type(t).__name__}")
            if t is not None and t.device not in devices:
                raise ValueError(f"{name}: expected `{arg}` on {places}, but got {t.device}")
        if ids.dtype != torch.int64:
            raise TypeError(f"{name}: expected `ids` int64, but got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name}: expected `ids` [B, T], but got {list(ids.shape)}")
        if history is not None:
            self._with_history(ids, history, cu_seqlens)  # its checks; the host hashes the concatenation
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            raise ValueError(
                f"{name}: expected `cu_seqlens` [S + 1] int32 or int64, "
                f"but got {list(cu_seqlens.shape)} {cu_seqlens.dtype}"
            )
        if cu_seqlens is not None and ids.shape[0] != 1:
            raise ValueError(f"{name}: expected `ids` [1, T] with `cu_seqlens`, but got {list(ids.shape)}")

    def _apply(self, fn, recurse: bool = True) -> NgramHashEmbedding:
        """``to``, ``cuda``, ``half``...: a host table stays on the host (pinned as it was), following dtype changes."""
        if not self.host_table:
            return super()._apply(fn, recurse)
        weight = self.embedding._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self.embedding._parameters["weight"] = weight
        dtype = fn(torch.empty(0, dtype=weight.dtype)).dtype  # what fn does to a float tensor's dtype
        if dtype != weight.dtype:
            converted = weight.detach().to(dtype)
            weight.data = converted.pin_memory() if weight.is_pinned() else converted
        return self

    def _with_history(self, ids: torch.Tensor, history: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("NgramHashEmbedding: pass `history` or `cu_seqlens`, not both")
        expected = (ids.shape[0], self.max_n - 1)
        if history.dim() != 2 or tuple(history.shape) != expected or history.dtype != ids.dtype:
            raise ValueError(
                f"NgramHashEmbedding: expected `history` of shape {list(expected)} and dtype {ids.dtype}, "
                f"but got {list(history.shape)} {history.dtype}"
            )
        return torch.cat([history, ids], dim=1)

    @torch.compiler.disable  # data-dependent splits and collectives: the model around it still compiles
    def _sharded_forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, drop: int) -> torch.Tensor:
        # A bad input must reach the other ranks before they wait for this one's rows.
        error = _ids_error(ids, None if self.lookup is None else self.lookup.shape[0])
        rows = torch.empty(0, dtype=torch.int64, device=self.offsets.device)
        if error is None:
            rows = self.hash(ids, cu_seqlens=cu_seqlens)[:, drop:] + self.offsets
        plan = _sharding.plan_lookup(rows.flatten(), self.sharding, error)
        weight = self.embedding.weight
        found = _sharding.ShardedLookup.apply(weight, plan, self.sharding, self.embedding.sparse)
        return found.view(*rows.shape, weight.shape[1]).flatten(-2)

    def extra_repr(self) -> str:
        text = f"max_n={self.max_n}, num_heads={self.num_heads}, embed_size={self.embed_size}, pad_id={self.pad_id}"
        if self.sharding is not None:
            start = self.sharding.start
            text += f", rows [{start}, {start + self.sharding.local_rows}) of {self.sharding.rows} on this rank"
        if self.host_table:
            text += ", host_table=True"
        return text


class _Embedding(nn.Embedding):
    """``nn.Embedding`` (same parameters, same state dict) whose dense CPU lookup is the ``lookup``
    operator: its backward writes the table's gradient in one pass with streaming stores, where
    ``F.embedding``'s fills the table with zeros and then adds the rows into it."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        w = self.weight
        plain = not self.sparse and self.padding_idx is None and self.max_norm is None and not self.scale_grad_by_freq
        if plain and w.device.type == "cpu" and not is_traceable_wrapper_subclass(w):
            return torch.ops.retrieval_attention.lookup(w, indices)
        return super().forward(indices)


def _ids_error(ids: torch.Tensor, vocab: int | None) -> str | None:
    """Why ``ids`` cannot be hashed, or None: the sharded lookup's check, made before any exchange."""
    if ids.dim() != 2 or ids.dtype != torch.int64:
        return f"NgramHashEmbedding: expected `ids` [B, T] int64, but got {list(ids.shape)} {ids.dtype}"
    if ids.numel() == 0:
        return None
    low, high = (int(x) for x in torch.aminmax(ids))
    if low < 0 or (vocab is not None and high >= vocab):
        bound = "" if vocab is None else f" and < {vocab} (the lookup's size)"
        return f"NgramHashEmbedding: expected `ids` >= 0{bound}, but got ids in [{low}, {high}]"
    return None


def _sharded_state_dict_hook(module: NgramHashEmbedding, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict[prefix + "embedding.weight"] = module.sharded_weight()


def _sharded_load_hook(
    module: NgramHashEmbedding, state_dict: dict, prefix: str, local_metadata, strict, missing, unexpected, errors
) -> None:
    """A sharded module takes a DTensor (its mesh's rows) or the whole table, and keeps its rows."""
    from torch.distributed.tensor import DTensor, Shard

    key = prefix + "embedding.weight"
    if key not in state_dict:
        return
    value = state_dict[key]
    if tuple(value.shape) != tuple(module._full_shape):
        raise ValueError(
            f"NgramHashEmbedding.load_state_dict: expected {key} of the whole table's shape "
            f"{list(module._full_shape)}, but got {list(value.shape)}"
        )
    if isinstance(value, DTensor):
        if value.device_mesh == module._mesh:
            state_dict[key] = value.redistribute(module._mesh, [Shard(0)]).to_local()
            return
        value = value.full_tensor()
    start = module.sharding.start
    state_dict[key] = value.narrow(0, start, module.sharding.local_rows)
