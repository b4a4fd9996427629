"""The job sweeper's loop: it sweeps with its idle timeout, several times a timeout, and
a failed sweep does not end it."""

from __future__ import annotations

import threading

from zerofs_csi.controller.job_sweeper import JobSweeper

IDLE_SECONDS = 0.06


def test_sweeps_go_on_after_a_failure() -> None:
    asked: list[float] = []
    third = threading.Event()

    def sweep(idle_seconds: float) -> list[str]:
        asked.append(idle_seconds)
        if len(asked) == 1:
            raise RuntimeError("the API server went away")
        if len(asked) == 3:
            third.set()
        return ["zerofs-restore-pvc-1"]

    sweeper = JobSweeper(sweep, IDLE_SECONDS).start()
    try:
        assert third.wait(5), f"only {len(asked)} sweeps"
    finally:
        sweeper.stop()
    assert set(asked) == {IDLE_SECONDS}
    count = len(asked)
    threading.Event().wait(3 * IDLE_SECONDS)
    assert len(asked) == count, "it swept after stop()"
