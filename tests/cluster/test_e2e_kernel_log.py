"""The e2e's check of the node's kernel log (tools/cluster/e2e.py): errors logged after
the mark are found whether or not the log's buffer dropped lines in between, and a log
that lost lines since the mark is a failure, never a pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "cluster"))

import e2e  # noqa: E402

BEFORE = """\
[    1.000000] Linux version 6.x
[   12.500000] nbd: registered device at major 43
[   30.250000] EXT4-fs (nbd0): mounted filesystem
"""
# The same log once the buffer is full: as many lines, the oldest gone.
WRAPPED = """\
[   12.500000] nbd: registered device at major 43
[   30.250000] EXT4-fs (nbd0): mounted filesystem
[   95.125000] I/O error, dev nbd0, sector 512 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 0
"""
GREW = (
    BEFORE
    + """\
[  100.000000] block nbd0: Connection timed out
[  100.100000] Buffer I/O error on dev nbd0, logical block 64, async page read
"""
)
CLEAN = BEFORE + "[  101.000000] EXT4-fs (nbd0): unmounting filesystem\n"
LOST = """\
[   31.000000] EXT4-fs (nbd0): re-mounted
[   95.125000] I/O error, dev nbd0, sector 512 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 0
"""

CASES = [
    pytest.param(WRAPPED, ["I/O error, dev nbd0"], id="buffer-full-same-line-count"),
    pytest.param(GREW, ["Buffer I/O error on dev nbd0"], id="log-grew"),
    pytest.param(CLEAN, [], id="clean"),
]


@pytest.mark.parametrize(("after", "expected"), CASES)
def test_errors_after_the_mark_are_found(after: str, expected: list[str]) -> None:
    mark = e2e.kernel_log_mark(BEFORE)
    assert mark == 30.25
    errors = e2e.kernel_errors_since(after, mark)
    assert len(errors) == len(expected)
    for error, text in zip(errors, expected, strict=True):
        assert text in error


def test_a_log_that_lost_lines_since_the_mark_fails() -> None:
    with pytest.raises(e2e.StepFailed, match="lost lines since 30.25 s"):
        e2e.kernel_errors_since(LOST, e2e.kernel_log_mark(BEFORE))
