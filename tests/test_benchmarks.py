"""The layer benchmark runs end to end on a tiny case and writes its table (no time is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_layer_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layer

    monkeypatch.setattr(bench_layer, "keep_freed_memory", lambda: False)  # leave this process's malloc alone
    bench_layer.main(["--cases", "1x9x2x16x12:float32", "--min-time", "0.01", "--no-chart", "--out", str(tmp_path)])
    table = (tmp_path / "layer_cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1x9x2x16x12:float32")]
    assert [row.split(" | ")[1] for row in rows] == ["fwd", "bwd", "fwd+bwd"]
    assert "n/a" not in table
    sys.modules.pop("bench_layer", None)


def test_projection_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_projection

    monkeypatch.setattr(bench_projection, "keep_freed_memory", lambda: False)
    bench_projection.main(["--cases", "9x2x16x12:float32", "--min-time", "0.01", "--out", str(tmp_path)])
    rows = [line for line in (tmp_path / "projection_cpu.md").read_text().splitlines() if line.startswith("| 9x2")]
    assert [row.split(" | ")[1] for row in rows] == ["fwd", "fwd+bwd"]
    sys.modules.pop("bench_projection", None)


def test_sharded_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_sharded

    argv = ["--ranks", "1,2", "--steps", "1", "--batch", "2", "--table-scale", "0.01", "--out", str(tmp_path)]
    bench_sharded.main(argv)
    rows = [line for line in (tmp_path / "sharded_cpu.md").read_text().splitlines() if line[:4] in ("| 1 ", "| 2 ")]
    assert len(rows) == 2
    assert "| 0.0 KiB / 0.0 KiB |" in rows[0]  # one rank owns every row: nothing crosses
    assert "| 0.0 KiB" not in rows[1]
    sys.modules.pop("bench_sharded", None)


def test_decode_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_decode

    monkeypatch.setattr(bench_decode, "keep_freed_memory", lambda: False)
    bench_decode.main(["--batches", "1,3", "--shape", "2x16x16", "--min-time", "0.01", "--out", str(tmp_path)])
    rows = [line for line in (tmp_path / "decode_cpu.md").read_text().splitlines() if line[:4] in ("| 1 ", "| 3 ")]
    assert len(rows) == 2
    sys.modules.pop("bench_decode", None)


def test_fp8_error_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fp8_error

    monkeypatch.setattr(fp8_error, "keep_freed_memory", lambda: False)
    argv = ["--cases", "1x9x2x16x12:bfloat16", "--table-rows", "50", "--min-time", "0.01", "--out", str(tmp_path)]
    fp8_error.main(argv)
    text = (tmp_path / "fp8_cpu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1x9x2x16x12:bfloat16 | ")]
    assert len(rows) == 4  # three error rows and one timing row
    assert "| bfloat16 | 2 |" in text and "| float8_e4m3fn + UE8M0 scales | 2 (1 + 1) |" in text  # rows of 1
    sys.modules.pop("fp8_error", None)


def test_prefetch_benchmark_writes_its_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_prefetch

    monkeypatch.setattr(bench_prefetch, "keep_freed_memory", lambda: False)
    argv = ["--cases", "1x9x16x16:float32", "--table-rows", "31,37", "--matmuls", "2", "--min-time", "0.01"]
    bench_prefetch.main([*argv, "--out", str(tmp_path)])
    rows = [line for line in (tmp_path / "prefetch_cpu.md").read_text().splitlines() if line.startswith("| 1x9")]
    assert [row.split(" | ")[1] for row in rows] == ["31", "37"]
    sys.modules.pop("bench_prefetch", None)
