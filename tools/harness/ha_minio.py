"""The soak's storage faults: a volume on a distributed MinIO set whose servers are
killed, restarted, cut off the network and restored under the writer, one at a time and
a write quorum at a time (``soak.py --minio-set``).

The set is four servers of one drive each (``tests/s3/minio.py``), the volume's
endpoint server ``a``: one server down leaves write quorum (three drives), two take it
away until one is back (reads still have their two). Each fault is held for
``hold_s`` seconds and undone, then the set is waited for until every server reports
write quorum, and ``gap_s`` more seconds let the volume settle before the next.

What is recorded of each fault, for ``docs/ha-minio.md``:

- how long the writer paused: the longest of a probe's 4 KiB direct writes, each with
  fdatasync, every ``PROBE_EVERY_S`` into a file of the volume, that overlapped the
  fault's window (from the fault until the set is healthy again plus the gap); an
  error of a probe write is an I/O error the run fails on;
- the volume server's restarts in the window (its pid changed) and the driver's NBD
  reconnects (``zerofs_csi_nbd_reconnects_total``, by result);
- the distinct warning and error lines the server and the plugin logged in the window.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minio import MinioSet
from s3store import client_of

from zerofs_csi.bench.plugin import PluginProcess, S3Storage
from zerofs_csi.servers.local_state import read_log

SERVERS = ("a", "b", "c", "d")
PROBE_EVERY_S = 0.5
PROBE_BLOCK = 4096
PROBE_FILE_BLOCKS = 256
# Distinct log lines kept per fault and source, and the length each is cut to.
LOG_LINES_KEPT = 12
LOG_LINE_CHARS = 300
# A warning or error line of ZeroFS (tracing's level field) or of the plugin's text log.
INTERESTING_LINE = re.compile(r"\b(WARN|WARNING|ERROR)\b")
# Parts of a line that differ between repeats of one message: times, numbers, hex ids.
VARYING = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z?|0x[0-9a-f]+|\b[0-9a-f]{8,}\b|\d+(\.\d+)?")


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: what is done to which servers, and undone."""

    name: str
    action: str  # "kill" (undone by restart) or "cut_off" (undone by restore)
    servers: tuple[str, ...]

    def apply(self, minio: MinioSet) -> None:
        for server in self.servers:
            getattr(minio, self.action)(server)

    def undo(self, minio: MinioSet) -> None:
        undo = {"kill": minio.restart, "cut_off": minio.restore}[self.action]
        for server in self.servers:
            undo(server)


SCHEDULE = (
    Fault("one server killed", "kill", ("d",)),
    Fault("one server cut off", "cut_off", ("c",)),
    Fault("write quorum lost: two servers killed", "kill", ("c", "d")),
    Fault("write quorum lost: two servers cut off", "cut_off", ("b", "c")),
    Fault("the endpoint's server killed", "kill", ("a",)),
    Fault("the endpoint's server cut off", "cut_off", ("a",)),
)


@dataclass
class FaultRecord:
    name: str
    at_s: float
    held_s: float
    healthy_after_undo_s: float | None = None
    longest_write_pause_s: float = 0.0
    probe_writes: int = 0
    server_restarts: int = 0
    nbd_reconnects: dict[str, float] = field(default_factory=dict)
    server_log: list[str] = field(default_factory=list)
    plugin_log: list[str] = field(default_factory=list)
    error: str = ""


class PauseProbe(threading.Thread):
    """Small synchronous writes into ``path`` every ``PROBE_EVERY_S``, each timed; the
    first one that fails is kept in ``error``."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="pause-probe", daemon=True)
        self.path = path
        self.writes: list[tuple[float, float]] = []  # (start, end), monotonic
        self.in_flight: float | None = None  # the start of the write under way
        self.error: OSError | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        # O_DIRECT needs an aligned buffer: mmap's is page-aligned.
        buffer = mmap.mmap(-1, PROBE_BLOCK)
        buffer[:] = os.urandom(PROBE_BLOCK)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            index = 0
            while not self.stopped.wait(PROBE_EVERY_S):
                started = self.in_flight = time.monotonic()
                try:
                    os.pwrite(fd, buffer, (index % PROBE_FILE_BLOCKS) * PROBE_BLOCK)
                    os.fdatasync(fd)
                except OSError as exc:
                    self.error = exc
                    return
                self.writes.append((started, time.monotonic()))
                self.in_flight = None
                index += 1
        finally:
            os.close(fd)
            buffer.close()

    def longest_pause(self, start: float, end: float) -> tuple[float, int]:
        """The longest write that overlapped [start, end] (one still under way counts
        until ``end``), and how many did."""
        overlapping = [b - a for a, b in self.writes if b >= start and a <= end]
        in_flight = self.in_flight
        if in_flight is not None and in_flight <= end:
            overlapping.append(end - in_flight)
        return (max(overlapping, default=0.0), len(overlapping))


class LogWindow:
    """The lines appended to a log file since it was opened (a file rotated meanwhile is
    read from its start)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def lines(self) -> Iterator[str]:
        return iter((read_log(self.path, since=self.offset) or "").splitlines())


def distinct_problems(lines: Iterator[str], secret: str) -> list[str]:
    """The warning and error lines, one per message (numbers and times aside), cut and
    with ``secret`` masked."""
    kept: dict[str, str] = {}
    for line in lines:
        if not INTERESTING_LINE.search(line):
            continue
        key = VARYING.sub("#", line)
        if key not in kept and len(kept) < LOG_LINES_KEPT:
            kept[key] = line.replace(secret, "***")[:LOG_LINE_CHARS]
    return list(kept.values())


def minio_storage(minio: MinioSet) -> S3Storage:
    bucket = "volumes"
    client_of(minio).create_bucket(Bucket=bucket)
    return S3Storage(minio.endpoint, bucket, minio.access_key, minio.secret_key)


class StorageFaults(threading.Thread):
    """Runs ``SCHEDULE`` round after round for ``window`` seconds from ``t0``."""

    def __init__(
        self,
        minio: MinioSet,
        plugin: PluginProcess,
        volume: Any,
        probe: PauseProbe,
        *,
        hold_s: float,
        gap_s: float,
        window: float,
        t0: float,
        log: Callable[[str], None],
    ) -> None:
        super().__init__(name="storage-faults", daemon=True)
        self.minio, self.plugin, self.volume, self.probe = minio, plugin, volume, probe
        self.hold_s, self.gap_s, self.window, self.t0 = hold_s, gap_s, window, t0
        self.log = log
        self.records: list[FaultRecord] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            for fault in SCHEDULE:
                if self.stopped.is_set() or time.monotonic() - self.t0 > self.window:
                    return
                record = self.inflict(fault)
                self.records.append(record)
                self.log(f"  {record.name}: {record}")

    def inflict(self, fault: Fault) -> FaultRecord:
        server_log = LogWindow(self.volume.server_log_path())
        plugin_log = LogWindow(self.plugin.log_path)
        reconnects = self._reconnects()
        pids = {self.volume.server_pid()}
        started = time.monotonic()
        record = FaultRecord(fault.name, round(started - self.t0, 2), self.hold_s)
        try:
            fault.apply(self.minio)
            self._watch_server(pids, started + self.hold_s)
            fault.undo(self.minio)
            record.healthy_after_undo_s = round(self.minio.wait_healthy(), 2)
            self._watch_server(pids, time.monotonic() + self.gap_s)
        except (RuntimeError, TimeoutError, OSError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        pause, writes = self.probe.longest_pause(started, time.monotonic())
        record.longest_write_pause_s = round(pause, 2)
        record.probe_writes = writes
        record.server_restarts = len(pids - {None}) - 1
        after = self._reconnects()
        record.nbd_reconnects = {k: after[k] - reconnects[k] for k in after}
        record.server_log = distinct_problems(server_log.lines(), self.minio.secret_key)
        record.plugin_log = distinct_problems(plugin_log.lines(), self.minio.secret_key)
        return record

    def _watch_server(self, pids: set[int | None], until: float) -> None:
        """Note the volume server's pid every half second until ``until``."""
        while time.monotonic() < until:
            pids.add(self.volume.server_pid())
            time.sleep(0.5)

    def _reconnects(self) -> dict[str, float]:
        return {
            result: self.plugin.metric("zerofs_csi_nbd_reconnects_total", result=result)
            for result in ("ok", "failed")
        }
