"""NgramHashEmbedding(host_table=True): the table in host memory, looked up (and prefetched) from the
compute device, trains with a host optimizer, and gives what the device table gives (docs/ngram.md#host-tables)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from retrieval_attention import NgramHashEmbedding
from retrieval_attention import host_table as host_table_module

import bad_input
from bad_input import BadCase
from conftest import DEVICES, NEEDS_CUDA
from tolerances import tolerance

VOCAB = 50
LOOKUP_SIZE = 80
DTYPE = torch.float64
STEPS = 3


def _pair(device: str, *, sparse: bool = False, lookup: bool = True) -> tuple[NgramHashEmbedding, NgramHashEmbedding]:
    """A device table and a host table with the same hash tables and weights."""
    table = torch.randint(0, VOCAB, (LOOKUP_SIZE,)) if lookup else None
    kwargs = {"token_vocab_size": VOCAB, "lookup": table, "sparse": sparse, "device": device, "dtype": DTYPE}
    plain = NgramHashEmbedding.from_seed([61, 53], 2, 8, **kwargs)
    host = NgramHashEmbedding.from_seed([61, 53], 2, 8, host_table=True, **kwargs)
    host.load_state_dict(plain.state_dict())
    return plain, host


def _ids(device: str, B: int = 3, T: int = 11) -> torch.Tensor:
    return torch.randint(0, LOOKUP_SIZE, (B, T), device=device)


@pytest.fixture
def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the host hashed (once per lookup actually done, prefetched or not)."""
    calls: list[int] = []
    real = host_table_module.host_rows
    monkeypatch.setattr(host_table_module, "host_rows", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_placement(device: str) -> None:
    _, host = _pair(device)
    assert host.embedding.weight.device.type == "cpu"
    assert host.offsets.device.type == device
    out = host(_ids(device))
    assert out.device.type == device and out.dtype == DTYPE
    assert "host_table=True" in repr(host)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [False, True], ids=["direct", "prefetched"])
@pytest.mark.parametrize("ids_on", ["compute", "host"])
def test_outputs_equal_device_table(device: str, prefetch: bool, ids_on: str, count_hashes: list[int]) -> None:
    plain, host = _pair(device)
    ids = _ids(device)
    given = ids if ids_on == "compute" else ids.cpu()
    if prefetch:
        host.prefetch(given)
    out = host(given)
    assert out.device.type == device
    assert torch.equal(out, plain(ids))
    assert len(count_hashes) == 1  # the prefetched lookup was used, not done again


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_then_other_ids(device: str, count_hashes: list[int]) -> None:
    plain, host = _pair(device)
    a, b = _ids(device), _ids(device)
    host.prefetch(a)
    stale = host._host._pending
    assert torch.equal(host(b), plain(b))
    assert host._host._pending is None  # the stale prefetch is dropped
    assert torch.equal(host(a), plain(a))
    stale.future.result()  # it ran to its end, unused
    assert len(count_hashes) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_then_ids_written(device: str, count_hashes: list[int]) -> None:
    plain, host = _pair(device)
    ids = _ids(device)
    host.prefetch(ids)
    stale = host._host._pending
    stale.future.result()  # the old ids hashed before they are written
    ids[0, 0] = (ids[0, 0] + 1) % LOOKUP_SIZE  # a new version: the prefetched rows are not these ids'
    assert torch.equal(host(ids), plain(ids))
    assert len(count_hashes) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_then_table_updated(device: str) -> None:
    plain, host = _pair(device)
    ids = _ids(device)
    host.prefetch(ids)
    host._host._pending.future.result()  # the old rows are gathered before the update
    with torch.no_grad():
        for module in (plain, host):
            module.embedding.weight.mul_(2.0)
    assert torch.equal(host(ids), plain(ids))


@pytest.mark.parametrize("device", DEVICES)
def test_history_and_packed_through_prefetch(device: str, count_hashes: list[int]) -> None:
    plain, host = _pair(device)
    ids = _ids(device, B=2, T=9)
    history = _ids(device, B=2, T=2)
    host.prefetch(ids, history=history)
    assert torch.equal(host(ids, history=history), plain(ids, history=history))
    packed = _ids(device, B=1, T=12)
    cu_seqlens = torch.tensor([0, 5, 5, 12], device=device)
    host.prefetch(packed, cu_seqlens=cu_seqlens)
    assert torch.equal(host(packed, cu_seqlens=cu_seqlens), plain(packed, cu_seqlens=cu_seqlens))
    assert len(count_hashes) == 2
    host.prefetch(ids, history=history)
    stale = host._host._pending
    assert torch.equal(host(ids), plain(ids))  # without the history: another request
    stale.future.result()
    assert len(count_hashes) == 4


def _train(module: NgramHashEmbedding, batches: list[torch.Tensor], target: torch.Tensor, prefetch: bool) -> None:
    params = list(module.parameters())
    optimizer = torch.optim.SparseAdam(params, lr=0.1) if module.embedding.sparse else torch.optim.SGD(params, lr=0.1)
    for step, ids in enumerate(batches):
        if prefetch and step == 0:
            module.prefetch(ids)
        loss = ((module(ids) - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if prefetch and step + 1 < len(batches):
            module.prefetch(batches[step + 1])  # after the step: the rows of the updated table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["direct", "prefetched"])
def test_training_equals_device_table(device: str, sparse: bool, prefetch: bool, count_hashes: list[int]) -> None:
    plain, host = _pair(device, sparse=sparse)
    batches = [_ids(device) for _ in range(STEPS)]
    target = torch.randn(3, 11, plain.embed_size, dtype=DTYPE, device=device)
    _train(plain, batches, target, prefetch=False)
    _train(host, batches, target, prefetch=prefetch)
    assert len(count_hashes) == STEPS  # every prefetch was used: issued after the step, it saw the updated table
    grad = host.embedding.weight.grad
    assert grad.device.type == "cpu" and grad.is_sparse == sparse
    assert host.embedding.weight.device.type == "cpu"
    tol = tolerance(DTYPE)
    torch.testing.assert_close(host.embedding.weight, plain.embedding.weight.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_is_the_adjoint_on_the_host(device: str) -> None:
    """<out, g> = <weight, grad>: the gradient of the device copy reaches the host rows, summed per row."""
    _, host = _pair(device, lookup=False)
    ids = _ids(device, B=2, T=6)
    out = host(ids)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, host.embedding.weight, g)
    assert grad.device.type == "cpu"
    weight = host.embedding.weight.detach()
    torch.testing.assert_close((out * g).sum().cpu(), (weight * grad).sum(), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip() -> None:
    plain, host = _pair("cpu")
    assert list(host.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(host.state_dict()[key], value), key
    blank = torch.zeros(LOOKUP_SIZE, dtype=torch.int64)
    other = NgramHashEmbedding.from_seed([61, 53], 2, 8, token_vocab_size=VOCAB, lookup=blank, dtype=DTYPE)
    other.load_state_dict(host.state_dict())
    ids = _ids("cpu")
    assert torch.equal(other(ids), host(ids))


def test_dtype_follows_device_stays() -> None:
    _, host = _pair("cpu")
    ids = _ids("cpu")
    expected = host(ids).float()
    host.prefetch(ids)  # of the float64 table: stale once the table is converted
    host._host._pending.future.result()
    host.float()
    assert host.embedding.weight.dtype == torch.float32 and host.embedding.weight.device.type == "cpu"
    out = host(ids)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert host.offsets.dtype == torch.int64


def test_pickle_and_deepcopy_with_a_prefetch_pending() -> None:
    _, host = _pair("cpu")
    ids = _ids("cpu")
    host.prefetch(ids)
    for clone in (pickle.loads(pickle.dumps(host)), copy.deepcopy(host)):
        assert clone._host._pending is None
        assert torch.equal(clone(ids), host(ids))


def test_compiled_model_around_it() -> None:
    _, host = _pair("cpu")
    ids = _ids("cpu")
    compiled = torch.compile(lambda x: host(x).sin())
    tol = tolerance(DTYPE)  # inductor's sin may round otherwise than eager's
    torch.testing.assert_close(compiled(ids), host(ids).sin(), rtol=tol, atol=tol)


def test_prefetch_error_raised_by_its_forward() -> None:
    _, host = _pair("cpu", lookup=False)
    ids = _ids("cpu")
    ids[0, 0] = -1
    host.prefetch(ids)
    with pytest.raises(ValueError, match="`ids`"):
        host(ids)


@NEEDS_CUDA
def test_cuda_module_to_keeps_table_on_host() -> None:
    _, host = _pair("cpu")
    ids = _ids("cpu")
    expected = host(ids)
    host.cuda()
    assert host.offsets.is_cuda and not host.embedding.weight.is_cuda
    out = host(ids.cuda())
    assert out.is_cuda and torch.equal(out.cpu(), expected)


@NEEDS_CUDA
@pytest.mark.parametrize("prefetch", [False, True], ids=["direct", "prefetched"])
def test_cuda_copies_from_pinned_staging(prefetch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows (and GPU ids) cross in pinned buffers: copies that do not block the host."""
    plain, host = _pair("cuda")
    pinned: list[bool] = []
    real = host_table_module.staging
    monkeypatch.setattr(host_table_module, "staging", lambda *a: pinned.append((t := real(*a)).is_pinned()) or t)
    ids = _ids("cuda")
    if prefetch:
        host.prefetch(ids)
    assert torch.equal(host(ids), plain(ids))
    assert pinned == [True] * (1 + prefetch)  # the rows; with prefetch, the ids too


@NEEDS_CUDA
def test_cuda_pinned_table_stays_pinned() -> None:
    """A table the user pinned (docs/ngram.md#host-tables) stays pinned through training and dtype changes."""
    plain, host = _pair("cuda", sparse=True)
    host.embedding.weight.data = host.embedding.weight.data.pin_memory()
    batches = [_ids("cuda") for _ in range(STEPS)]
    target = torch.randn(3, 11, plain.embed_size, dtype=DTYPE, device="cuda")
    _train(plain, batches, target, prefetch=False)
    _train(host, batches, target, prefetch=True)
    assert host.embedding.weight.is_pinned()
    tol = tolerance(DTYPE)
    torch.testing.assert_close(host.embedding.weight, plain.embedding.weight.cpu(), rtol=tol, atol=tol)
    host.float()
    assert host.embedding.weight.is_pinned() and host.embedding.weight.dtype == torch.float32


@NEEDS_CUDA
def test_cuda_prefetch_overlaps_work_on_the_current_stream() -> None:
    plain, host = _pair("cuda")
    ids = _ids("cuda", B=4, T=256)
    # The ids are written by a kernel still queued behind long work: the prefetch must wait for them.
    busy = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):
        busy = busy @ busy / busy.norm()
    late = torch.empty_like(ids).copy_(ids)
    host.prefetch(late)
    for _ in range(20):
        busy = busy @ busy / busy.norm()
    out = host(late)
    assert torch.equal(out, plain(ids))
    assert torch.isfinite(busy).all()


def _build(**changes):
    def build() -> tuple:
        _, host = _pair("cpu")
        args = {"ids": _ids("cpu"), **changes}
        ids = args.pop("ids")
        return host.prefetch, (ids,), args

    return build


def _with_process_group() -> tuple:
    return NgramHashEmbedding, (torch.tensor([1, 3]), torch.tensor([[5]]), 4), {"host_table": True, "process_group": 1}


def _prefetch_on_device_table() -> tuple:
    plain, _ = _pair("cpu")
    return plain.prefetch, (_ids("cpu"),), {}


CASES: dict[str, BadCase] = {
    "ids_dtype": BadCase(_build(ids=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "`ids`"),
    "ids_shape": BadCase(_build(ids=torch.zeros(6, dtype=torch.int64)), ValueError, "`ids`"),
    "ids_type": BadCase(_build(ids=[[1, 2]]), TypeError, "`ids`"),
    "history_shape": BadCase(_build(history=torch.zeros(3, 5, dtype=torch.int64)), ValueError, "`history`"),
    "history_with_cu_seqlens": BadCase(
        _build(history=torch.zeros(3, 2, dtype=torch.int64), cu_seqlens=torch.tensor([0, 11])),
        ValueError,
        "`history`",
        expected_got=False,
    ),
    "cu_seqlens_dtype": BadCase(_build(cu_seqlens=torch.tensor([0.0, 11.0])), ValueError, "`cu_seqlens`"),
    "cu_seqlens_rows": BadCase(_build(cu_seqlens=torch.tensor([0, 11])), ValueError, "`ids`"),
    "process_group": BadCase(_with_process_group, ValueError, "`host_table"),
    "device_table": BadCase(_prefetch_on_device_table, RuntimeError, "`host_table=True`"),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
