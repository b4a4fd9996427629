"""The link keeper's process rules: one per state directory, started without waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from zerofs_csi import link_keeper


def test_one_keeper_per_state_directory(tmp_path: Path) -> None:
    first = link_keeper.hold_lock(tmp_path)
    assert first is not None
    try:
        assert link_keeper.hold_lock(tmp_path) is None
        # A second keeper started meanwhile leaves at once, successfully.
        done = subprocess.run(
            [sys.executable, "-m", "zerofs_csi.link_keeper", "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "already runs" in done.stderr
    finally:
        os.close(first)
    again = link_keeper.hold_lock(tmp_path)
    assert again is not None
    os.close(again)


def test_spawn_does_not_wait_and_logs_beside_the_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started = time.monotonic()
    link_keeper.spawn(state, link_keeper.LogFormat.TEXT)
    assert time.monotonic() - started < 5
    # It runs on its own: here it says why it cannot listen (no nbd module on a host
    # without it) or that it runs.
    log = state / link_keeper.LOG_NAME
    deadline = time.monotonic() + 60
    while not any(s in log.read_text() for s in ("link keeper running", "LINK_DEAD")):
        assert time.monotonic() < deadline, f"the keeper wrote: {log.read_text()!r}"
        time.sleep(0.05)
