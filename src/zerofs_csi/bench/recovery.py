"""Benchmark: how long a writer waits when its volume's server is killed, against how
long the server itself takes to come back, in the same run.

One plugin (local backend, the ZeroFS stand-in or ``zerofs``), one staged ext4 volume,
a writer in its mount (4 MiB writes, an fsync every 16 MiB). Each cycle kills the
server's process group (kill -9) once the writer is under way. Ours: the writer's
longest single write or fsync from the kill until it has written 16 MiB more. Baseline:
the server's restart, from the kill until a new server process answers an NBD
handshake. The goal is a ratio of at most 1.2: the workload waits for the restart and
little more.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from zerofs_csi.bench.measure import Benchmark, Comparison
from zerofs_csi.bench.plugin import (
    PluginProcess,
    S3Storage,
    create_volume,
    running_plugin,
    wait_until,
)
from zerofs_csi.servers.local import nbd_server_answers
from zerofs_csi.servers.local_state import ServerPaths

MiB = 1 << 20
WRITE_MIB = 4
FSYNC_EVERY_MIB = 16
FILE_MIB = 64
VOLUME_SIZE = 256 * MiB
RESTART_TIMEOUT_S = 120.0
PROGRESS_TIMEOUT_S = 300.0


class _Writer(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.path = path
        self.written = 0  # MiB
        self.longest = 0.0
        self.error: OSError | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        data = os.urandom(WRITE_MIB * MiB)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while not self.stopping.is_set():
                    offset = (self.written % FILE_MIB) * MiB
                    self._timed(os.pwrite, fd, data, offset)
                    self.written += WRITE_MIB
                    if self.written % FSYNC_EVERY_MIB == 0:
                        self._timed(os.fsync, fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc

    def _timed(self, call: Callable[..., object], *args: object) -> None:
        started = time.monotonic()
        call(*args)
        self.longest = max(self.longest, time.monotonic() - started)

    def wait_for(self, mib: int) -> None:
        goal = self.written + mib
        wait_until(
            lambda: self.written >= goal or self.error is not None,
            PROGRESS_TIMEOUT_S,
            f"the writer to write {mib} MiB",
        )
        if self.error is not None:
            raise RuntimeError(f"the writer got {self.error}")


def _server_pid(state_dir: Path, volume_id: str) -> int:
    state = json.loads(ServerPaths(state_dir / "servers" / volume_id).state.read_text())
    return int(state["pid"])


def _answers_after_restart(state_dir: Path, volume_id: str, killed: int) -> bool:
    try:
        pid = _server_pid(state_dir, volume_id)
    except (OSError, ValueError, KeyError):
        return False
    socket = state_dir / "sockets" / volume_id / "nbd.sock"
    return pid != killed and nbd_server_answers(socket, 1.0)


def bench_server_kill(
    zerofs_command: str, cycles: int, warmup: int, s3: S3Storage | None = None
) -> list[Comparison]:
    pauses: list[float] = []
    restarts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="zerofs-bench-kill-") as tmp:
        workdir = Path(tmp)
        state_dir = workdir / "state"
        plugin = PluginProcess(workdir, zerofs_command=zerofs_command, s3=s3, log_level="warning")
        with running_plugin(plugin):
            # A kill is a pause only where every write is durable when answered.
            volume = create_volume(
                plugin,
                workdir,
                "ext4",
                VOLUME_SIZE,
                name="bench-server-kill",
                parameters={"syncWrites": "true"},
            )
            volume.stage()
            writer = _Writer(Path(volume.staging) / "mount" / "data")
            writer.start()
            try:
                writer.wait_for(FSYNC_EVERY_MIB)
                for cycle in range(warmup + cycles):
                    killed = _server_pid(state_dir, volume.volume_id)
                    writer.longest = 0.0
                    os.killpg(killed, signal.SIGKILL)
                    started = time.monotonic()
                    vid = volume.volume_id

                    def restarted_server(k: int = killed, v: str = vid) -> bool:
                        return _answers_after_restart(state_dir, v, k)

                    wait_until(restarted_server, RESTART_TIMEOUT_S, "the server's restart")
                    restarted = time.monotonic() - started
                    writer.wait_for(FSYNC_EVERY_MIB)
                    if cycle >= warmup:
                        restarts.append(restarted)
                        pauses.append(writer.longest)
            finally:
                writer.stopping.set()
                writer.join(PROGRESS_TIMEOUT_S)
                volume.unstage()
                volume.delete()
    return [Comparison("server_kill_pause", "s", pauses, "server restart", restarts)]


BENCHMARKS: dict[str, Benchmark] = {
    "server_kill": lambda run: bench_server_kill(
        run.zerofs_command, run.cycles, run.warmup, run.s3
    ),
}
