"""Host tests of the concurrent-stage plumbing: actions start together, failed attempts
are cleaned up and retried, and what never succeeded is counted."""

from __future__ import annotations

import threading

from zerofs_csi.bench import node as bench_node


def test_run_all_retries_after_cleanup_and_counts_what_never_worked() -> None:
    calls = {0: 0, 1: 0, 2: 0}
    cleaned: list[int] = []
    lock = threading.Lock()

    def action(index: int, fails: int) -> None:
        with lock:
            calls[index] += 1
            attempt = calls[index]
        if attempt <= fails:
            raise RuntimeError(f"volume {index} attempt {attempt} failed")

    outcome = bench_node.run_all(
        [lambda: action(0, 0), lambda: action(1, 1), lambda: action(2, 5)],
        attempts=3,
        cleanup=[lambda i=i: cleaned.append(i) for i in range(3)],
    )
    assert calls == {0: 1, 1: 2, 2: 3}
    assert sorted(cleaned) == [1, 2, 2, 2]
    assert outcome.unfinished == 1
    assert len(outcome.errors) == 4
    assert outcome.wall_s >= 0


def test_run_all_starts_every_action_before_any_finishes() -> None:
    started = threading.Barrier(8, timeout=10)
    outcome = bench_node.run_all([started.wait for _ in range(8)])
    assert outcome.errors == [] and outcome.unfinished == 0


def test_summary_groups_errors_that_differ_only_in_numbers() -> None:
    errors = [
        f"UNAVAILABLE: volume server for conc-{i} exited with status 1\nlog line {i}"
        for i in range(5)
    ] + ["RuntimeError: no free NBD device"]
    summary = bench_node.summarize(errors)
    lines = summary.splitlines()
    assert lines[0].startswith("    5x UNAVAILABLE: volume server for conc-N exited")
    assert "e.g." in lines[1] and "log line 0" in lines[2]
    assert "1x RuntimeError: no free NBD device" in summary
