"""An n-gram table in host memory, looked up from a compute device, with prefetch (docs/ngram.md#host-tables).

``NgramHashEmbedding(host_table=True)`` keeps ``embedding.weight`` on the host and its other buffers
on the compute device. A lookup hashes the ids on the host, gathers the rows there (into pinned
memory when the compute device is a GPU) and copies them to the compute device. ``HostTable``
holds what this needs besides the module's own state: the host copies of the hash buffers, the
side CUDA stream, and the one pending prefetch.

Why the host hashes: the gather runs on the host and needs the row indices there; the ids are
``(max_n - 1) * H`` times fewer than the indices, and ids that are already on the host (a data
loader's) need no device synchronization at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .functional import ngram_hash

# Prefetches of every module run on these threads, in the order they were asked for; torch ops
# release the GIL, so the caller's thread keeps launching work meanwhile.
_WORKERS = 1
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _submit(fn: Callable[[], Lookup]) -> Future:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="ngram-prefetch")
    return _executor.submit(fn)


@dataclass
class HashBuffers:
    """The module's hash buffers on the host: ``lookup`` ``[V]`` or None, ``multipliers``, ``primes``, ``offsets``."""

    lookup: torch.Tensor | None
    multipliers: torch.Tensor
    primes: torch.Tensor
    offsets: torch.Tensor
    pad_id: int


@dataclass
class Lookup:
    """One lookup's result: ``rows`` ``[B, T, K]`` int64 host row indices (for the backward),
    ``found`` ``[B, T, K, dim]`` on the compute device without autograd, and the event after which
    ``found`` is ready on the side stream (None: ready on the current stream)."""

    rows: torch.Tensor
    found: torch.Tensor
    ready: torch.cuda.Event | None = None


@dataclass(frozen=True)
class Request:
    """A lookup's arguments: ``ids`` ``[B, T]`` int64, ``history`` ``[B, max_n - 1]`` or None,
    ``cu_seqlens`` ``[S + 1]`` or None, each on the host or the compute device."""

    ids: torch.Tensor
    history: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.ids, self.history, self.cu_seqlens)

    def versions(self, weight: torch.Tensor) -> tuple[object, ...]:
        """What a later write would change: the version counters of the arguments and of the table,
        and the table's storage and dtype (``weight.data = ...`` leaves the version counter alone)."""
        return (*(_version(t) for t in self.tensors()), weight._version, weight.data_ptr(), weight.dtype)

    def same_tensors(self, other: Request) -> bool:
        return all(a is b for a, b in zip(self.tensors(), other.tensors(), strict=True))


@dataclass
class Pending:
    """A prefetch in flight and what it was asked for; the request's strong references keep ``id()`` unique."""

    request: Request
    versions: tuple[object, ...]
    future: Future


def _version(t: torch.Tensor | None) -> int:
    return -1 if t is None else t._version


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to("cpu")


def host_rows(
    buffers: HashBuffers, ids: torch.Tensor, history: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """Row indices ``[B, T, K]`` int64 on the host (hashes plus each head's offset) of host ``ids`` ``[B, T]``."""
    drop = 0
    if history is not None:
        ids, drop = torch.cat([history, ids], dim=1), history.shape[1]
    if buffers.lookup is not None:
        ids = torch.index_select(buffers.lookup, 0, ids.flatten()).view(ids.shape)
    hashes = ngram_hash(ids, buffers.multipliers, buffers.primes, pad_id=buffers.pad_id, cu_seqlens=cu_seqlens)
    return hashes[:, drop:] + buffers.offsets


def staging(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty pinned host tensor for a copy to the GPU that does not block (from PyTorch's caching host allocator)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def gather(weight: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``weight[rows]`` ``[*rows.shape, dim]`` on ``device``, without autograd: gathered on the host, into
    pinned memory and copied without blocking (on the current stream) when ``device`` is a GPU."""
    weight = weight.detach()
    shape = (*rows.shape, weight.shape[1])
    if device.type == "cpu":
        return torch.index_select(weight, 0, rows.flatten()).view(shape)
    staged = staging(shape, weight.dtype)
    torch.index_select(weight, 0, rows.flatten(), out=staged.view(-1, weight.shape[1]))
    # The caching host allocator keeps the pinned block until the copy that reads it has finished.
    return staged.to(device, non_blocking=True)


class HostRows(torch.autograd.Function):
    """The looked-up rows with autograd: the gradient of ``found`` becomes ``weight``'s, on the host."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, found: torch.Tensor, sparse: bool) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows, ctx.sparse = weight.shape[0], sparse
        return found

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (rows,) = ctx.saved_tensors
        # nn.Embedding's own backward, on the host: the same (sparse or dense) gradient as a device table's.
        weight_grad = torch.ops.aten.embedding_backward(grad.to("cpu"), rows, ctx.num_rows, -1, False, ctx.sparse)
        return weight_grad, None, None, None


class HostTable:
    """The per-module state of a host table: host hash buffers (cached), the side stream, one pending prefetch."""

    def __init__(self) -> None:
        self._pending: Pending | None = None
        self._stream: torch.cuda.Stream | None = None
        self._buffers: tuple[tuple[object, ...], HashBuffers] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {}  # threads, events and streams do not pickle: a copy starts with nothing pending

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()

    def buffers(self, module: torch.nn.Module) -> HashBuffers:
        """The module's hash buffers on the host, copied again only when one of them changed."""
        sources = (module.lookup, module.multipliers, module.primes, module.offsets)
        key = (*(id(t) for t in sources), *(_version(t) for t in sources), module.hash_pad_id)
        if self._buffers is None or self._buffers[0] != key:
            self._buffers = (key, HashBuffers(*(_to_host(t) for t in sources), module.hash_pad_id))
        return self._buffers[1]

    def prefetch(self, module: torch.nn.Module, request: Request) -> None:
        """Start the lookup of checked arguments on the worker thread (and the side stream on CUDA)."""
        device, weight = module.offsets.device, module.embedding.weight
        buffers = self.buffers(module)
        inputs = list(request.tensors())
        copied = stream = None
        if device.type == "cuda":
            stream = self._side_stream(device)
            if any(t is not None and t.is_cuda for t in inputs):
                # The ids come to the host on the side stream, once the kernels that wrote them have run.
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    inputs = [_pinned_copy(t) if t is not None and t.is_cuda else t for t in inputs]
                    copied = torch.cuda.Event()
                    copied.record(stream)
                for t in request.tensors():
                    if t is not None and t.is_cuda:
                        t.record_stream(stream)

        def work() -> Lookup:
            if copied is not None:
                copied.synchronize()
            with torch.no_grad():
                rows = host_rows(buffers, *inputs)
                if stream is None:
                    return Lookup(rows, gather(weight, rows, device))
                with torch.cuda.stream(stream):
                    found = gather(weight, rows, device)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                return Lookup(rows, found, ready)

        self._pending = Pending(request, request.versions(weight), _submit(work))

    def lookup(self, module: torch.nn.Module, request: Request) -> torch.Tensor:
        """Rows ``[B, T, K, dim]`` on the compute device, with autograd to the host weight: the pending
        prefetch's when it was for these very tensors, unchanged since, and the table too; else found now.

        Matching compares tensor identities and version counters, never values: no device sync."""
        device, weight = module.offsets.device, module.embedding.weight
        pending, self._pending = self._pending, None
        result = None
        if (
            pending is not None
            and pending.request.same_tensors(request)
            and pending.versions == request.versions(weight)
        ):
            result = pending.future.result()
            if result.ready is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(result.ready)
                result.found.record_stream(current)  # allocated on the side stream, read on this one
        if result is None:
            buffers = self.buffers(module)
            with torch.no_grad():
                rows = host_rows(buffers, *(_to_host(t) for t in request.tensors()))
                result = Lookup(rows, gather(weight, rows, device))
        return HostRows.apply(weight, result.rows, result.found, module.embedding.sparse)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    return staging(t.shape, t.dtype).copy_(t, non_blocking=True)
