"""Chaos under a writer: server stalls and kills, plugin kills, both at once.

    python tools/harness/chaos.py [--rounds N] [--seed S] [--max-stall S] [--hung-after S]

Needs the kernel's NBD driver and root: ``make chaos`` runs it in the microVM. One plugin
(``--role all``, local backend; ZeroFS from ``ZEROFS_BIN`` or PATH, else the stand-in)
and one ext4 volume staged and published through the CSI API. A writer writes 4 MiB at a
time and fsyncs every 16 MiB the whole run long while, round after round, one fault
drawn from the seed strikes:

- stall: the volume server's process group is stopped (SIGSTOP) for 5 s up to
  ``--max-stall`` seconds, then continued; at least one stall outlasts ``--hung-after``
  (the plugin's ``--server-hung-timeout``), so the server is declared hung, killed and
  restarted while stopped;
- server kill: kill -9 of the server's process group (its supervisor restarts it);
- plugin kill: kill -9 of the plugin, started again after 0 to 12 s;
- both: server and plugin killed together, the plugin started again 10 s later;
- plugin stuck in unmount: the writer stops, the server is stopped, NodeUnpublish and
  NodeUnstage are called and the plugin, blocked in the unmount's writes, is killed; the
  server is continued after its stall, the plugin started again, and unstage, stage and
  publish retried as the CO would before a new writer starts.

After each round the writer must have made progress past the fault, every fsync'd MiB
must read back, and the kernel log (read from /dev/kmsg as it is written, so a flood of
"Possible stuck request" lines cannot push anything out unseen) must hold none of
``FORBIDDEN``. At the end the volume is unpublished, unstaged, staged again and every
fsync'd MiB is read back through the fresh device. The seed is printed first; results go
to ``build/harness/chaos.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SYNC_WRITES,
    MiB,
    block,
    call_with_retry,
    check,
    kill_server,
    plugin_process,
    run_and_close,
    server,
    verify_file,
    write_results,
)

from zerofs_csi.bench.plugin import create_volume, stop_plugin  # noqa: E402

STALL = "stall server"
KILL_SERVER = "kill -9 server"
KILL_PLUGIN = "kill -9 plugin"
KILL_BOTH = "kill -9 server and plugin"
STUCK_UNMOUNT = "kill -9 plugin stuck in unmount"
KINDS = (STALL, KILL_SERVER, KILL_PLUGIN, KILL_BOTH, STUCK_UNMOUNT)
# A plugin blocked in an unmount exits only once the stalled server answers again: that
# stall is kept shorter than the fixtures' wait for a killed plugin to exit.
STUCK_STALL_MAX_S = 60.0
MIN_STALL_S = 5.0
# Kernel lines that mean a request failed, a filesystem gave up or a reply was lost.
FORBIDDEN = ("I/O error", "Aborting journal", "Remounting filesystem read-only", "Suspicious reply")
WRITE_MIB = 4
FSYNC_EVERY_MIB = 16
FILE_MIB = 64
# Files kept: the oldest goes when a new one starts, so the volume never fills up.
KEEP_FILES = 4
# How long the writer may make no progress after a round before the run fails.
PROGRESS_TIMEOUT_S = 240.0


@dataclass
class Round:
    number: int
    kind: str
    seconds: float = 0.0  # stall length, or the delay before the plugin starts again
    detail: str = ""
    writer_pause_s: float = 0.0  # longest write or fsync wait during the round
    server_restart_s: float | None = None  # kill until the new server answers
    round_s: float = 0.0


@dataclass
class ChaosResults:
    seed: int
    rounds: list[Round] = field(default_factory=list)
    durable_mib: int = 0
    stuck_request_lines: int = 0
    forbidden_lines: list[str] = field(default_factory=list)


def draw_rounds(rng: random.Random, count: int, max_stall: float, hung_after: float) -> list[Round]:
    """``count`` rounds; every kind comes up once before any comes up again, and the first
    stall outlasts ``hung_after`` when ``max_stall`` allows it."""
    kinds: list[str] = []
    while len(kinds) < count:
        kinds += rng.sample(KINDS, len(KINDS))
    rounds = []
    long_stall_drawn = max_stall <= hung_after + MIN_STALL_S
    for number, kind in enumerate(kinds[:count]):
        seconds = 0.0
        if kind == STALL:
            low = MIN_STALL_S if long_stall_drawn else hung_after + MIN_STALL_S
            seconds = round(rng.uniform(low, max_stall), 1)
            long_stall_drawn = long_stall_drawn or seconds > hung_after
        elif kind == KILL_PLUGIN:
            seconds = round(rng.uniform(0.0, 12.0), 1)
        elif kind == KILL_BOTH:
            seconds = 10.0
        elif kind == STUCK_UNMOUNT:
            seconds = round(rng.uniform(MIN_STALL_S, min(max_stall, STUCK_STALL_MAX_S)), 1)
        rounds.append(Round(number, kind, seconds))
    return rounds


class KernelLog(threading.Thread):
    """Reads /dev/kmsg from now on; keeps the lines that hold a FORBIDDEN text."""

    def __init__(self) -> None:
        super().__init__(name="kmsg", daemon=True)
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.forbidden: list[str] = []
        self.stuck_requests = 0
        self.overrun = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                self.stopped.wait(0.05)
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten before it was read
                    self.overrun = True
                    continue
                raise
            text = record.decode(errors="replace").split(";", 1)[-1].strip()
            if "Possible stuck request" in text:
                self.stuck_requests += 1
            if any(needle in text for needle in FORBIDDEN):
                self.forbidden.append(text)

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        os.close(self.fd)


class Writer(threading.Thread):
    """4 MiB writes, an fsync every 16 MiB, file after file (the last KEEP_FILES kept);
    ``durable`` holds the MiB of each kept file made durable. ``longest_wait`` is the
    longest single write or fsync since it was last reset."""

    def __init__(
        self, directory: Path, seed: int, first: int = 0, durable: dict[str, int] | None = None
    ) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.directory, self.seed, self.first = directory, seed, first
        self.durable: dict[str, int] = dict(durable or {})
        self.number = first
        self.progress = 0  # MiB written
        self.error: OSError | None = None
        self.longest_wait = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        number = self.first
        try:
            while not self.stopping.is_set():
                name = f"chaos-{number:04d}.bin"
                self.number = number + 1
                if number >= KEEP_FILES:
                    oldest = f"chaos-{number - KEEP_FILES:04d}.bin"
                    self.durable.pop(oldest, None)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.directory / oldest)
                self.durable[name] = 0
                fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    for first in range(0, FILE_MIB, WRITE_MIB):
                        if self.stopping.is_set():
                            break
                        data = b"".join(block(self.seed, name, first + i) for i in range(WRITE_MIB))
                        self._timed(os.pwrite, fd, data, first * MiB)
                        self.progress += WRITE_MIB
                        if (first + WRITE_MIB) % FSYNC_EVERY_MIB == 0:
                            self._timed(os.fsync, fd)
                            self.durable[name] = first + WRITE_MIB
                finally:
                    os.close(fd)
                number += 1
        except OSError as exc:
            self.error = exc

    def _timed(self, call: Callable[..., object], *args: object) -> None:
        started = time.monotonic()
        call(*args)
        self.longest_wait = max(self.longest_wait, time.monotonic() - started)


class Chaos:
    def __init__(
        self,
        workdir: Path,
        seed: int,
        rounds: list[Round],
        hung_after: float,
        parameters: dict[str, str],
        log: Callable[[str], None] = print,
    ) -> None:
        self.workdir, self.seed, self.log = workdir, seed, log
        self.results = ChaosResults(seed, rounds)
        self.plugin = plugin_process(
            workdir, extra_args=("--server-hung-timeout", f"{hung_after:g}")
        )
        self.parameters = parameters
        self.volume: Any = None
        self.target = workdir / "pods" / "writer" / "volume"
        self.kernel = KernelLog()

    def run(self) -> None:
        self.kernel.start()
        self.plugin.start()
        size = (KEEP_FILES + 2) * FILE_MIB * MiB
        self.volume = create_volume(
            self.plugin, self.workdir, fs_type="ext4", size=size, parameters=self.parameters
        )
        self.volume.stage()
        self.volume.publish(str(self.target))
        self.writer = Writer(self.target, self.seed)
        self.writer.start()
        try:
            self.wait_progress(self.writer, FSYNC_EVERY_MIB, "the first writes")
            for plan in self.results.rounds:
                self.round(plan)
        finally:
            self.stop_writer()
        self.restage_and_verify(self.writer)
        self.check_kernel("after the restage")

    def wait_progress(self, writer: Writer, mib: int, what: str) -> None:
        goal = writer.progress + mib
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while writer.progress < goal:
            check(writer.error is None, f"{what}: the writer got {writer.error}")
            check(writer.is_alive(), f"{what}: the writer stopped")
            check(
                time.monotonic() < deadline,
                f"{what}: no {mib} MiB written within {PROGRESS_TIMEOUT_S:g} s "
                f"(written {writer.progress} MiB)",
            )
            time.sleep(0.05)

    def stop_writer(self) -> None:
        self.writer.stopping.set()
        self.writer.join(PROGRESS_TIMEOUT_S)
        check(self.writer.error is None, f"the writer got {self.writer.error}")
        check(not self.writer.is_alive(), "the writer did not stop")

    def stuck_unmount(self, plan: Round) -> None:
        """Stop the writer and the server, unstage, kill the plugin blocked in the
        unmount; continue the server after its stall, start the plugin again and have
        the CO's retries and a new writer carry on."""
        self.stop_writer()
        volume, pid = self.volume, self.volume.server_pid()
        check(pid is not None, "no volume server to stall")
        # Dirty data for the unmount to write back.
        (self.target / "unsynced.bin").write_bytes(os.urandom(8 * MiB))
        os.killpg(pid, signal.SIGSTOP)
        resume = threading.Timer(plan.seconds, lambda: os.killpg(pid, signal.SIGCONT))
        resume.start()

        def unstage() -> None:
            with contextlib.suppress(Exception):
                volume.unpublish(str(self.target))
                volume.unstage()

        threading.Thread(target=unstage, daemon=True).start()
        time.sleep(min(3.0, plan.seconds / 2))
        self.plugin.kill9()  # returns once the unmount's writes are answered
        resume.join()
        self.plugin.start()
        call_with_retry("NodeUnpublish", lambda: volume.unpublish(str(self.target)))
        call_with_retry("NodeUnstage", volume.unstage)
        call_with_retry("NodeStage", volume.stage)
        call_with_retry("NodePublish", lambda: volume.publish(str(self.target)))
        for name, mib in self.writer.durable.items():
            verify_file(self.target / name, self.seed, name, mib)
        self.writer = Writer(self.target, self.seed, self.writer.number, self.writer.durable)
        self.writer.start()
        plan.detail = f"server {pid} stopped {plan.seconds:g} s under an unstage, plugin killed"

    def round(self, plan: Round) -> None:
        started = time.monotonic()
        writer = self.writer
        writer.longest_wait = 0.0
        pid = self.volume.server_pid()
        if plan.kind == STALL:
            check(pid is not None, "no volume server to stall")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)
            time.sleep(plan.seconds)
            # The supervisor may have killed it as hung meanwhile.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
            now = self.volume.server_pid()
            plan.detail = f"server {pid} stopped {plan.seconds:g} s" + (
                f", replaced by {now}" if now not in (None, pid) else ""
            )
        elif plan.kind == KILL_SERVER:
            killed = kill_server(self.volume)
            plan.server_restart_s = self.wait_new_server(killed)
            plan.detail = f"server {killed} killed"
        elif plan.kind == STUCK_UNMOUNT:
            self.stuck_unmount(plan)
            writer = self.writer
        else:
            if plan.kind == KILL_BOTH:
                kill_server(self.volume)
            self.plugin.kill9()
            time.sleep(plan.seconds)
            self.plugin.start()
            plan.detail = f"plugin restarted after {plan.seconds:g} s (start {self.plugin.starts})"
        self.wait_progress(writer, FSYNC_EVERY_MIB, f"round {plan.number} ({plan.kind})")
        plan.writer_pause_s = round(writer.longest_wait, 2)
        for name, mib in list(writer.durable.items()):
            verify_file(self.target / name, self.seed, name, mib)
        self.check_kernel(f"round {plan.number} ({plan.kind})")
        plan.round_s = round(time.monotonic() - started, 1)
        self.log(
            f"round {plan.number}: {plan.kind}: {plan.detail}; longest writer wait "
            f"{plan.writer_pause_s:.2f} s; ok in {plan.round_s:.1f} s"
        )

    def wait_new_server(self, killed: int | None) -> float:
        """Seconds from now until a new server process runs and answers NBD."""
        started = time.monotonic()
        sockets = self.plugin.state_dir / "sockets" / self.volume.volume_id
        from zerofs_csi.servers.local import nbd_server_answers

        while True:
            pid = self.volume.server_pid()
            if pid not in (None, killed) and nbd_server_answers(sockets / "nbd.sock", 1.0):
                return round(time.monotonic() - started, 2)
            check(time.monotonic() - started < 120, "the killed server was not restarted")
            time.sleep(0.01)

    def check_kernel(self, when: str) -> None:
        check(not self.kernel.overrun, f"{when}: kernel log records were lost unread")
        check(
            not self.kernel.forbidden,
            f"{when}: the kernel logged: " + " | ".join(self.kernel.forbidden[:5]),
        )

    def restage_and_verify(self, writer: Writer) -> None:
        volume = self.volume
        call_with_retry("NodeUnpublish", lambda: volume.unpublish(str(self.target)))
        call_with_retry("NodeUnstage", volume.unstage)
        call_with_retry("NodeStage", volume.stage)
        call_with_retry("NodePublish", lambda: volume.publish(str(self.target)))
        for name, mib in writer.durable.items():
            verify_file(self.target / name, self.seed, name, mib)
        self.results.durable_mib = sum(writer.durable.values())

    def close(self) -> None:
        self.results.stuck_request_lines = self.kernel.stuck_requests
        self.results.forbidden_lines = list(self.kernel.forbidden)
        try:
            stop_plugin(self.plugin)
        finally:
            self.kernel.close()


def run(
    rounds: int,
    seed: int | None = None,
    max_stall: float = 120.0,
    hung_after: float = 60.0,
    parameters: dict[str, str] | None = None,
    workdir: Path | None = None,
    results_name: str = "chaos",
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """One chaos run; returns its results (also written under build/harness/)."""
    if rounds < 1 or max_stall < MIN_STALL_S:
        raise ValueError(f"rounds must be positive and max_stall at least {MIN_STALL_S:g} s")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
    plan = draw_rounds(random.Random(seed), rounds, max_stall, hung_after)
    log(
        f"chaos: seed {seed}, {rounds} rounds, stalls up to {max_stall:g} s, "
        f"hung after {hung_after:g} s, server {server().describe()}"
    )
    for r in plan:
        log(f"  planned: round {r.number}: {r.kind}" + (f" ({r.seconds:g} s)" if r.seconds else ""))
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="zerofs-chaos-"))
    # Kills under a writer are pauses only where every write is durable when answered.
    parameters = {**SYNC_WRITES, **(parameters or {})}
    chaos = Chaos(workdir, seed, plan, hung_after, parameters, log)
    failure = run_and_close(chaos)
    results: dict[str, object] = {
        "harness": "chaos",
        "passed": failure is None,
        "failure": failure,
        "max_stall_s": max_stall,
        "hung_after_s": hung_after,
        "parameters": parameters or {},
        **asdict(chaos.results),
        "plugin_log": str(chaos.plugin.log_path),
    }
    path = write_results(results_name, results)
    if chaos.plugin.log_path.exists():
        shutil.copy(chaos.plugin.log_path, path.with_suffix(".plugin.log"))
    if own_workdir and failure is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        log(f"chaos: FAILED (seed {seed}): {failure}")
        log(chaos.plugin.log_tail(30))
    else:
        log(
            f"chaos: OK: {rounds} rounds, seed {seed}, {results['durable_mib']} MiB verified, "
            f"against {server().describe()}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ITERATIONS") or 20))
    parser.add_argument(
        "--seed", type=int, default=int(os.environ["SEED"]) if os.environ.get("SEED") else None
    )
    parser.add_argument("--max-stall", type=float, default=120.0, help="longest stall, seconds")
    parser.add_argument(
        "--hung-after", type=float, default=60.0, help="the plugin's --server-hung-timeout"
    )
    parser.add_argument(
        "--connections", type=int, default=None, help="the StorageClass's nbdConnections"
    )
    args = parser.parse_args(argv)
    parameters = {} if args.connections is None else {"nbdConnections": str(args.connections)}
    results = run(args.rounds, args.seed, args.max_stall, args.hung_after, parameters)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
