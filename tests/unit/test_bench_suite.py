"""Host tests of the benchmark suite's wiring: every benchmark reachable, heavy ones run
fewer cycles, bad options refused before anything runs."""

from __future__ import annotations

import pytest

from zerofs_csi.bench import suite as bench_suite

EXPECTED = {
    "attach",
    "attach_scaling",
    "reconcile",
    "throughput",
    "server_kill",
    "sync_writes",
    "stage",
    "concurrent_stage",
    "snapshot",
}


def test_every_benchmark_is_in_the_suite() -> None:
    assert set(bench_suite.all_benchmarks()) == EXPECTED
    assert bench_suite.HEAVY <= EXPECTED


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("attach", (30, 3)),
        ("attach_scaling", (30, 3)),
        ("stage", (5, 1)),
        ("throughput", (5, 1)),
        ("snapshot", (5, 1)),
        ("sync_writes", (5, 1)),
    ],
)
def test_heavy_benchmarks_run_the_heavy_cycle_count(name: str, expected: tuple[int, int]) -> None:
    assert bench_suite.cycles_for(name, cycles=30, heavy_cycles=5, warmup=3) == expected


@pytest.mark.parametrize(
    "argv",
    [["--cycles", "0"], ["--heavy-cycles", "0"], ["--warmup", "-1"], ["--only", "nonsense"]],
)
def test_bad_options_exit_2_before_running(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_suite.main(argv)
    assert exit_info.value.code == 2
    assert "bench:" not in capsys.readouterr().out
