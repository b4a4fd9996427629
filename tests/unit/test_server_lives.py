"""A volume server's lives file (``servers.lives``): what is recorded, and what it says
about writes a device attached to one of the lives may have lost."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from zerofs_csi.servers import lives


def test_a_life_is_recorded_once_started_and_once_ended(tmp_path: Path) -> None:
    assert lives.current_life(tmp_path) == 0
    lives.record_exit(tmp_path, 0)  # no life yet: nothing to end
    lives.record_start(tmp_path)
    assert lives.current_life(tmp_path) == 1
    lives.record_exit(tmp_path, 137)
    lives.record_exit(tmp_path, 0)  # the same end seen twice (supervisor, then a stage)
    lives.record_start(tmp_path)
    recorded = [(life.exited, life.status) for life in lives.read_lives(tmp_path)]
    assert recorded == [(True, 137), (False, None)]
    assert lives.current_life(tmp_path) == 2


@pytest.mark.parametrize(
    ("text", "attached_life", "reason"),
    [
        ("start 10\n", 1, None),
        ("start 10\nexit 11 0\n", 1, None),
        ("start 10\nexit 11 0\nstart 12\n", 1, None),
        ("start 10\nexit 11 1\nstart 12\n", 1, "exited with status 1"),
        ("start 10\nexit 11 137\n", 1, "was killed by SIGKILL"),
        ("start 10\nexit 11 143\nstart 12\n", 1, "was killed by SIGTERM"),
        ("start 10\nexit 11 unknown\nstart 12\n", 1, "ended while nobody watched it"),
        ("start 10\nstart 12\n", 1, "before it could record its exit"),
        ("start 10\nexit 11 137\nstart 12\n", 2, None),
        # Lines that do not parse (a torn write, a hand) are skipped, not fatal.
        ("start 10\ngarbage\nexit x 0\nexit 11\nexit 11 0\nstart\n", 1, None),
        ("", 0, None),
        ("start 10\nexit 11 137\nstart 12\n", 0, "was killed by SIGKILL"),
    ],
)
def test_writes_are_lost_when_a_life_since_the_attach_ended_other_than_gracefully(
    tmp_path: Path, text: str, attached_life: int, reason: str | None
) -> None:
    (tmp_path / lives.LIVES_FILE).write_text(text)
    found = lives.lost_writes(tmp_path, attached_life)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found
        assert "started 1970-01-01T00:00:10Z" in found


@pytest.mark.parametrize(
    ("returncode", "status"), [(0, 0), (1, 1), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)]
)
def test_a_return_code_is_kept_as_a_shell_status(returncode: int, status: int) -> None:
    assert lives.shell_status(returncode) == status
