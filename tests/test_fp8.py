"""FP8 tables (docs/ngram.md#fp8-tables): quantize_rows_fp8's bound, fp8_lookup against the plain-PyTorch
dequantization bit for bit, Fp8NgramHashEmbedding against the table it came from, and bad input."""

from __future__ import annotations

import pytest
import torch

import retrieval_attention as ra
from retrieval_attention import NgramHashEmbedding, dequantize_rows_fp8, fp8_lookup, quantize_rows_fp8
from retrieval_attention.fp8 import AMAX_FLOOR, E4M3_MAX, fp8_bytes_per_row

import bad_input
from bad_input import BadCase
from conftest import DEVICES, NEEDS_CUDA

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
E4M3_HALF_ULP = 2.0**-4  # relative: 3 mantissa bits, rounding to nearest
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # absolute, in units of the block's scale: half of 2^-9
# The scale is < amax / 224 up to the float32 rounding of amax * (1 / 448).
SCALE_SLACK = 1 + 2.0**-20


def _column_scales(scales: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """Each column's scale 2^(e - 127) as float64, [R, dim]."""
    powers = torch.pow(2.0, scales.double() - 127)
    return powers.repeat_interleave(block, dim=1)[:, :dim]


def _rows(kind: str, R: int, dim: int) -> torch.Tensor:
    """Adversarial and random tables, float32 [R, dim]."""
    if kind == "normal":
        return torch.randn(R, dim)
    if kind == "wide_range":  # magnitudes over 2^-40 .. 2^40 in one table
        return torch.randn(R, dim) * torch.pow(2.0, torch.randint(-40, 40, (R, dim)).float())
    if kind == "zeros":
        return torch.zeros(R, dim)
    if kind == "tiny":  # below the amax floor: the floor's scale, subnormal e4m3 codes
        return torch.randn(R, dim) * 1e-7
    if kind == "one_huge":  # one block holds a huge value next to small ones
        x = torch.randn(R, dim) * 1e-3
        x[:, 0] = 1e4
        return x
    if kind == "negative":
        return -torch.rand(R, dim) * 3
    if kind == "pow2_amax":  # amax exactly 448 * 2^k or 2^k: the scale must not be doubled
        x = torch.rand(R, dim) * 0.5
        x[:, 0] = E4M3_MAX * torch.pow(2.0, torch.arange(R).float() - R // 2)
        x[:, -1] = -torch.pow(2.0, torch.arange(R).float())
        return x
    if kind == "e4m3_midpoints":  # halfway between two e4m3 values: round to even
        return torch.tensor([[1.0625, 1.1875, -1.0625, 448.0, 0.0, 2.0**-10, 3 * 2.0**-10, 2.0**-7]]).repeat(R, 4)
    raise AssertionError(kind)


KINDS = ["normal", "wide_range", "zeros", "tiny", "one_huge", "negative", "pow2_amax", "e4m3_midpoints"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("dim", "block"), [(64, 32), (256, 32), (256, 128), (50, 32), (7, 16)])
def test_quantize_bound(kind: str, dim: int, block: int) -> None:
    x = _rows(kind, 6, dim)
    if kind == "e4m3_midpoints":
        x = x[:, :dim] if x.shape[1] >= dim else x.repeat(1, -(-dim // x.shape[1]))[:, :dim]
    rows, scales = quantize_rows_fp8(x, block)
    assert rows.dtype == torch.float8_e4m3fn and rows.shape == x.shape
    assert scales.dtype == torch.uint8 and scales.shape == (6, -(-dim // block))
    assert not torch.isnan(rows.float()).any(), "a value saturated into NaN"
    s = _column_scales(scales, block, dim)
    deq = dequantize_rows_fp8(rows, scales, block=block, dtype=torch.float64)
    err = (deq - x.double()).abs()
    bound = E4M3_HALF_ULP * x.double().abs() + E4M3_SUBNORMAL_HALF_STEP * s
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    # The scale is the least power of two that holds the block: 448 * s / 2 < amax <= 448 * s.
    padded = torch.nn.functional.pad(x.double().abs(), (0, scales.shape[1] * block - dim))
    amax = padded.view(6, -1, block).amax(-1).clamp_min(AMAX_FLOOR)
    block_scale = torch.pow(2.0, scales.double() - 127)
    assert (amax <= E4M3_MAX * block_scale * SCALE_SLACK).all()
    assert (E4M3_MAX * block_scale / 2 < amax * SCALE_SLACK).all()
    assert (block_scale <= amax / 224 * SCALE_SLACK).all()


def test_quantize_exact_cases() -> None:
    x = torch.tensor([[448.0, 1.0, -2.0, 0.0], [2.0**20, 1.0625, 1.1875, 3.0]])
    rows, scales = quantize_rows_fp8(x, 4)
    assert scales.tolist() == [[127], [127 + 12]]  # 448 fits 2^0; 2^20 / 448 -> 2^12
    deq = dequantize_rows_fp8(rows, scales, block=4, dtype=torch.float32)
    assert deq[0].tolist() == [448.0, 1.0, -2.0, 0.0]
    assert deq[1, 0].item() == 2.0**20
    zeros_rows, zeros_scales = quantize_rows_fp8(torch.zeros(1, 8), 8)
    assert zeros_rows.float().eq(0).all() and zeros_scales.item() == 127 - 22  # 1e-4 / 448 -> 2^-22
    mid_rows, _ = quantize_rows_fp8(torch.tensor([[448.0, 1.0625, 1.1875, -1.0625]]), 4)
    assert mid_rows.float().tolist() == [[448.0, 1.0, 1.25, -1.0]]  # halfway cases round to even


def test_quantize_any_float_dtype_and_device_kept() -> None:
    x = torch.randn(5, 64)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        rows, scales = quantize_rows_fp8(x.to(dtype), 32)
        ref_rows, ref_scales = quantize_rows_fp8(x.to(dtype).float(), 32)
        assert torch.equal(rows.view(torch.uint8), ref_rows.view(torch.uint8)) and torch.equal(scales, ref_scales)


def _lookup_inputs(R: int, dim: int, block: int, device: str, *, any_bytes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized table, or (any_bytes) every e4m3 byte (NaN too) with every finite scale byte."""
    if any_bytes:
        rows = torch.randint(0, 256, (R, dim), dtype=torch.uint8)
        rows.view(-1)[:256] = torch.arange(min(256, rows.numel()), dtype=torch.uint8)  # every byte once
        rows = rows.view(torch.float8_e4m3fn)
        scales = torch.randint(0, 255, (R, -(-dim // block)), dtype=torch.uint8)
        return rows.to(device), scales.to(device)
    rows, scales = quantize_rows_fp8(torch.randn(R, dim) * 3, block)
    return rows.to(device), scales.to(device)


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("any_bytes", [False, True], ids=["quantized", "any_bytes"])
@pytest.mark.parametrize(("dim", "block"), [(64, 32), (256, 32), (256, 128), (50, 32), (24, 8), (5, 2)])
def test_lookup_matches_reference(device: str, dtype: torch.dtype, any_bytes: bool, dim: int, block: int) -> None:
    R = 37
    rows, scales = _lookup_inputs(R, dim, block, device, any_bytes=any_bytes)
    table = dequantize_rows_fp8(rows, scales, block=block, dtype=dtype)
    for index_dtype in (torch.int64, torch.int32):
        for shape in ((11,), (3, 4), (2, 0), ()):
            indices = torch.randint(0, R, shape, dtype=index_dtype, device=device)
            _same_bits(fp8_lookup(rows, scales, indices, block=block, dtype=dtype), table[indices.long()])


@pytest.mark.parametrize("device", DEVICES)
def test_lookup_strided_table_and_e8m0_scales(device: str) -> None:
    rows, scales = _lookup_inputs(20, 96, 32, device, any_bytes=False)
    wide = torch.zeros(20, 200, dtype=torch.uint8, device=device)
    wide[:, 8:104] = rows.view(torch.uint8)
    strided = wide[:, 8:104].view(torch.float8_e4m3fn)  # rows 200 bytes apart
    indices = torch.randint(0, 20, (9,), device=device)
    expected = fp8_lookup(rows, scales, indices, block=32)
    _same_bits(fp8_lookup(strided, scales, indices, block=32), expected)
    _same_bits(fp8_lookup(rows, scales.view(torch.float8_e8m0fnu), indices, block=32), expected)
    _same_bits(fp8_lookup(rows.t().contiguous().t(), scales.t().contiguous().t(), indices, block=32), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    rows, scales = _lookup_inputs(16, 64, 32, device, any_bytes=False)
    indices = torch.randint(0, 16, (3, 5), device=device)
    # test_schema compares float8 inputs with arithmetic float8 tensors lack; the schema is checked below.
    tests = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    for dtype in (torch.bfloat16, torch.float32):
        op = torch.ops.retrieval_attention.fp8_lookup
        torch.library.opcheck(op, (rows, scales, indices), {"block": 32, "dtype": dtype}, test_utils=tests)
    before = (rows.view(torch.uint8).clone(), scales.clone(), indices.clone())
    fp8_lookup(rows, scales, indices, block=32)
    assert torch.equal(rows.view(torch.uint8), before[0]) and torch.equal(scales, before[1])
    assert torch.equal(indices, before[2]) and not op.default._schema.is_mutable


def _module(device: str, dtype: torch.dtype = torch.float32) -> NgramHashEmbedding:
    module = NgramHashEmbedding.from_seed([97, 61, 31], 2, 128, token_vocab_size=100, device=device, dtype=dtype)
    with torch.no_grad():  # rows of different magnitudes, one with a huge entry
        module.embedding.weight.mul_(torch.logspace(-3, 3, module.embedding.weight.shape[0], device=device)[:, None])
        module.embedding.weight[5, 3] = 1e5
    return module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [32, 16])
def test_module_within_bound_of_source(
    device: str, table_dtype: torch.dtype, out_dtype: torch.dtype, block: int
) -> None:
    module = _module(device, table_dtype)
    fp8 = module.to_fp8(block, dtype=out_dtype)
    ids = torch.randint(0, 100, (3, 17), device=device)
    with torch.no_grad():
        expected = module(ids).double()
    actual = fp8(ids)
    assert actual.shape == expected.shape and actual.dtype == out_dtype
    index = module.hash(ids) + module.offsets
    s = _column_scales(fp8.scales, block, fp8.rows.shape[1])[index].flatten(-2)
    err = (actual.double() - expected).abs()
    # The dequantized value is e4m3 times a power of two: exact in bfloat16, so no second rounding.
    bound = E4M3_HALF_ULP * expected.abs() + E4M3_SUBNORMAL_HALF_STEP * s
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert (err > 0).any(), "nothing was quantized"


@pytest.mark.parametrize("device", DEVICES)
def test_module_history_and_packed(device: str) -> None:
    fp8 = _module(device).to_fp8()
    ids = torch.randint(0, 100, (2, 9), device=device)
    full = fp8(ids)
    k = fp8.max_n - 1
    for t in range(k, 9):
        _same_bits(fp8(ids[:, t : t + 1], history=ids[:, t - k : t]), full[:, t : t + 1])
    packed = torch.cat([ids[0], ids[1, :4]])[None]
    cu_seqlens = torch.tensor([0, 9, 13], device=device)
    out = fp8(packed, cu_seqlens=cu_seqlens)
    _same_bits(out[:, :9], full[:1])
    _same_bits(out[:, 9:], fp8(ids[1:, :4]))


def test_module_memory_and_state() -> None:
    module = _module("cpu")
    fp8 = module.to_fp8(32)
    dim = module.embedding.weight.shape[1]
    assert dim == 64 and fp8.bytes_per_row() == fp8_bytes_per_row(64, 32) == 66
    assert fp8.rows.element_size() * fp8.rows[0].numel() + fp8.scales[0].numel() == 66
    assert not any(True for _ in fp8.parameters())
    assert fp8.multipliers is module.multipliers and fp8.offsets is module.offsets
    loaded = module.to_fp8(32)
    loaded.load_state_dict(fp8.state_dict())
    ids = torch.randint(0, 100, (2, 5))
    _same_bits(loaded(ids), fp8(ids))


@pytest.mark.parametrize("device", DEVICES)
def test_module_compile_fullgraph(device: str) -> None:
    torch._dynamo.reset()
    fp8 = _module(device).to_fp8()
    compiled = torch.compile(fp8, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (5, 11):
            ids = torch.randint(0, 100, (2, T), device=device)
            _same_bits(compiled(ids), fp8(ids))


def test_module_exports() -> None:
    fp8 = _module("cpu").to_fp8()
    ids = torch.randint(0, 100, (2, 7))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    exported = torch.export.export(fp8, (ids,), dynamic_shapes=({0: batch, 1: seq},))
    assert any("fp8_lookup" in str(node.target) for node in exported.graph.nodes)
    other = torch.randint(0, 100, (3, 12))
    _same_bits(exported.module()(other), fp8(other))


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_lookup_cuda_matches_cpu(dtype: torch.dtype) -> None:
    for dim, block in ((256, 32), (64, 32), (50, 32), (24, 8)):
        rows, scales = _lookup_inputs(300, dim, block, "cpu", any_bytes=True)
        indices = torch.randint(0, 300, (4096,))
        expected = fp8_lookup(rows, scales, indices, block=block, dtype=dtype)
        actual = fp8_lookup(rows.cuda(), scales.cuda(), indices.cuda(), block=block, dtype=dtype)
        _same_bits(actual, expected)


@NEEDS_CUDA
def test_module_cuda_matches_cpu() -> None:
    module = _module("cpu")
    ids = torch.randint(0, 100, (3, 33))
    expected = module.to_fp8()(ids)
    _same_bits(module.cuda().to_fp8()(ids.cuda()), expected)


def test_exported() -> None:
    for name in ("Fp8NgramHashEmbedding", "fp8_lookup", "quantize_rows_fp8", "dequantize_rows_fp8"):
        assert name in ra.__all__ and hasattr(ra, name)


def _lookup_call(device: str = "cpu", **changes) -> tuple:
    rows, scales = quantize_rows_fp8(torch.randn(4, 64), 32)
    args = {"rows": rows, "scales": scales, "indices": torch.tensor([0, 3, 1]), "block": 32, "dtype": torch.bfloat16}
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    args.update(changes)
    return fp8_lookup, (args.pop("rows"), args.pop("scales"), args.pop("indices")), args


def _case(error: type[BaseException], pattern: str, **changes) -> BadCase:
    return BadCase(lambda: _lookup_call(**changes), error, pattern)


CASES: dict[str, BadCase] = {
    "lookup-rows-dtype": _case(TypeError, "`rows`", rows=torch.zeros(4, 64, dtype=torch.uint8)),
    "lookup-rows-rank": _case(ValueError, "`rows`", rows=torch.zeros(4, 64, 1).to(torch.float8_e4m3fn)),
    "lookup-scales-dtype": _case(TypeError, "`scales`", scales=torch.zeros(4, 2)),
    "lookup-scales-shape": _case(ValueError, "`scales`", scales=torch.zeros(4, 3, dtype=torch.uint8)),
    "lookup-scales-rows": _case(ValueError, "`scales`", scales=torch.zeros(5, 2, dtype=torch.uint8)),
    "lookup-indices-dtype": _case(TypeError, "`indices`", indices=torch.tensor([0.0])),
    "lookup-index-too-large": _case(IndexError, "`indices`", indices=torch.tensor([0, 4])),
    "lookup-index-negative": _case(IndexError, "`indices`", indices=torch.tensor([[-1, 2]], dtype=torch.int32)),
    "lookup-block-0": _case(ValueError, "`block`", block=0),
    "lookup-block-mismatch": _case(ValueError, "`scales`", block=16),
    "lookup-dtype": _case(TypeError, "`dtype`", dtype=torch.int32),
    "quantize-weight-nan": BadCase(
        lambda: (quantize_rows_fp8, (torch.tensor([[1.0, float("nan")]]),), {}), ValueError, "`weight`"
    ),
    "quantize-weight-int": BadCase(
        lambda: (quantize_rows_fp8, (torch.ones(2, 3, dtype=torch.int64),), {}), TypeError, "`weight`"
    ),
    "quantize-weight-rank": BadCase(lambda: (quantize_rows_fp8, (torch.ones(6),), {}), ValueError, "`weight`"),
    "quantize-block-0": BadCase(lambda: (quantize_rows_fp8, (torch.ones(2, 6), 0), {}), ValueError, "`block`"),
    "module-dtype": BadCase(lambda: (_module("cpu").to_fp8, (), {"dtype": torch.int8}), TypeError, "`dtype`"),
    "lookup-cuda-scales-device": BadCase(
        lambda: _lookup_call("cuda", scales=torch.zeros(4, 2, dtype=torch.uint8)), RuntimeError, "`scales`", cuda=True
    ),
    "lookup-cuda-indices-device": BadCase(
        lambda: _lookup_call("cuda", indices=torch.tensor([0])), RuntimeError, "`indices`", cuda=True
    ),
}


@bad_input.parametrize(CASES)
def test_bad_input_names_the_argument(name: str) -> None:
    bad_input.check_in_child(__name__, name)
