"""Host tests of the benchmark output: the JSON entry format of the node benchmarks and
the ratio chart."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from zerofs_csi.bench import chart as bench_chart
from zerofs_csi.bench.measure import Comparison, print_table, write_results
from zerofs_csi.bench.node import ConcurrentComparison
from zerofs_csi.bench.zerofs_server import ZeroFSServer

STANDIN = ZeroFSServer("/repo/tools/zerofs-standin", real=False, version="stand-in")
ZEROFS = ZeroFSServer("/opt/zerofs", real=True, version="zerofs 2.3.0")

ENTRY_KEYS = {"name", "unit", "ours", "baseline", "ratio_p50"}


def entry(name: str, unit: str, ours: float, base: float) -> dict[str, object]:
    return Comparison(name, unit, [ours], "baseline tool", [base]).result()


def test_concurrent_entry_keeps_the_format_and_adds_failures() -> None:
    result = ConcurrentComparison(
        "stage_concurrent_32", "s", [40.0], "32 Go sequences", [80.0], 0, 3, 0, 1
    ).result()
    assert set(result) >= ENTRY_KEYS
    assert result["ratio_p50"] == 0.5
    assert result["baseline"] == {"name": "32 Go sequences", "p50": 80.0, "p95": 80.0}
    assert result["failures"] == {"ours": 0, "baseline": 3}
    assert result["unfinished"] == {"ours": 0, "baseline": 1}


def test_node_entries_merge_into_an_existing_bench_file(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    write_results(path, [Comparison("attach", "ms", [1.0], "nbd-client", [10.0])], STANDIN)
    write_results(path, [Comparison("stage_fresh", "ms", [2.0, 3.0], "go", [10.0, 12.0])], ZEROFS)
    results = json.loads(path.read_text())["results"]
    assert [r["name"] for r in results] == ["attach", "stage_fresh"]
    # Each entry keeps the server of the run that measured it.
    assert [r["server"] for r in results] == [
        {"command": "/repo/tools/zerofs-standin", "real": False, "version": "stand-in"},
        {"command": "/opt/zerofs", "real": True, "version": "zerofs 2.3.0"},
    ]


def test_table_names_the_server() -> None:
    table = io.StringIO()
    print_table([Comparison("stage_fresh", "ms", [2.0], "go", [10.0])], ZEROFS, table)
    assert table.getvalue().splitlines()[0] == "server: ZeroFS (zerofs 2.3.0, /opt/zerofs)"


def test_bars_skip_entries_without_a_ratio() -> None:
    results = [
        entry("attach", "ms", 20, 300),
        {"name": "broken", "unit": "ms", "ours": {"p50": 1}, "baseline": {}, "ratio_p50": None},
        entry("write_seq", "MiB/s", 200, 100),
    ]
    bars = bench_chart.bars_from(results)
    assert [b.name for b in bars] == ["attach", "write_seq"]


@pytest.mark.parametrize(
    ("unit", "ours", "base", "better"),
    [
        ("ms", 20, 300, True),
        ("ms", 300, 20, False),
        ("s", 1, 1.5, True),
        ("MiB/s", 200, 100, True),
        ("MiB/s", 50, 100, False),
    ],
)
def test_which_side_wins_depends_on_the_unit(
    unit: str, ours: float, base: float, better: bool
) -> None:
    (bar,) = bench_chart.bars_from([entry("x", unit, ours, base)])
    assert bar.ours_better is better
    assert f"{unit}, baseline tool" in bar.label


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_chart_is_a_png_growing_with_the_entries(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    few = [entry("attach", "ms", 20, 300), entry("detach", "ms", 3, 250)]
    many = few + [entry(f"e{i}", "ms", i + 1, 10) for i in range(10)]
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    source = tmp_path / "bench.json"
    source.write_text(json.dumps({"results": few}))
    assert bench_chart.main([str(source), str(small)]) == 0
    bench_chart.draw(bench_chart.bars_from(many), large)
    (w1, h1), (w2, h2) = png_size(small), png_size(large)
    assert w1 == w2 > 800
    assert h2 > h1 > 100


def test_nothing_to_draw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no benchmark entry"):
        bench_chart.draw([], tmp_path / "x.png")
