"""The lives of a volume's server: when each one started and how it ended.

ZeroFS answers an NBD write once the data is in its memory and makes it durable at the
next flush (a client's, or its own every ``flush_interval_secs``) unless the volume has
``sync_writes``. A server that dies any other way than by its graceful shutdown (which
flushes) may take acknowledged writes with it, and the kernel, reconnected to the next
server, sends the flush that was in flight to a server with nothing to flush: the
filesystem would be told that data is durable which is gone. So whoever runs a server
appends to ``lives`` in its socket directory, before starting it, ``start <time>``, and
once it has exited, ``exit <time> <status>`` (a shell's status: 128 + N for signal N,
``unknown`` when nobody saw it end). A server killed with whatever records its exit (a
container killed whole) leaves a start with no exit. The node reads the file before it
connects a device to a server it was not attached to.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

LIVES_FILE = "lives"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Life:
    started_at: float
    exited: bool = False
    # None with ``exited``: the end was seen, not its status.
    status: int | None = None

    @property
    def clean(self) -> bool:
        """Ended by the server's own graceful shutdown (status 0)."""
        return self.exited and self.status == 0


def shell_status(returncode: int) -> int:
    """A ``subprocess`` return code as a shell reports it: 128 + N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(status: int | None) -> str:
    if status is None:
        return "ended while nobody watched it"
    if status > 128:
        try:
            return f"was killed by {signal.Signals(status - 128).name}"
        except ValueError:
            pass
    return f"exited with status {status}"


def _append(directory: Path, line: str) -> None:
    # One write of a short line to a file opened O_APPEND: whole, whoever else appends.
    fd = os.open(
        directory / LIVES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record_start(directory: Path) -> None:
    """Call before starting the server."""
    _append(directory, f"start {time.time():.3f}\n")


def record_exit(directory: Path, status: int | None) -> None:
    """Call once the server has exited; a second call for the same life adds nothing."""
    lives = read_lives(directory)
    if not lives or lives[-1].exited:
        return
    _append(directory, f"exit {time.time():.3f} {UNKNOWN if status is None else status}\n")


def read_lives(directory: Path) -> list[Life]:
    """The lives recorded, oldest first; a line that does not parse is skipped."""
    try:
        text = (directory / LIVES_FILE).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    lives: list[Life] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            if fields[0] == "start" and len(fields) == 2:
                lives.append(Life(float(fields[1])))
            elif fields[0] == "exit" and len(fields) == 3 and lives and not lives[-1].exited:
                status = None if fields[2] == UNKNOWN else int(fields[2])
                float(fields[1])  # a time, as written
                lives[-1] = Life(lives[-1].started_at, True, status)
        except (IndexError, ValueError):
            continue
    return lives


def current_life(directory: Path) -> int:
    """The number of the life now running (1 for the first): what a device attached now
    is attached to. 0 when no life is recorded."""
    return len(read_lives(directory))


def lost_writes(directory: Path, attached_life: int) -> str | None:
    """Why writes acknowledged to a device attached during life ``attached_life`` may
    be lost, or None: one of the lives since ended other than by a graceful shutdown.
    The life now running (the last) counts once it has ended. ``attached_life`` 0 (a
    device attached before lives were recorded) counts every life recorded."""
    lives = read_lives(directory)
    for number in range(max(attached_life, 1), len(lives) + 1):
        life = lives[number - 1]
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(life.started_at))
        if life.exited and not life.clean:
            return f"its server (started {started}) {describe_status(life.status)}"
        if not life.exited and number < len(lives):
            return f"its server (started {started}) was killed before it could record its exit"
    return None
