"""Node benchmarks: NodeStage and NodeUnstage through the CSI API against the Go driver's
exec sequence (``go_driver``), and 32 NodeStage calls at once.

Ours is the plugin as users run it (``python -m zerofs_csi --role all --backend local``
with ``--zerofs-command``: ZeroFS, or in a checkout the stand-in; see ``zerofs_server``),
driven over gRPC. The
baseline runs the same server program and storage, in the same VM.

Both sides start and stop a server per stage and unstage, as both drivers do. That is
the same program on both sides and, under TCG, most of the time, so the entries
``stage_fresh``, ``stage_existing`` and ``unstage`` compare the node's own work without
it: for ours, the RPC's time less the plugin's own ``ensure_server`` / ``remove_server``
stage durations (its ``zerofs_csi_stage_duration_seconds`` metrics); for the baseline,
the steps after the 9P socket answered and before the server is stopped. The same
entries with ``_total`` keep the server's start and stop on both sides.
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from zerofs_csi.bench.go_driver import DeviceReservations, GoStyleVolume, require_tools
from zerofs_csi.bench.measure import Benchmark, Comparison, Timer
from zerofs_csi.bench.plugin import (
    PluginProcess,
    S3Storage,
    create_volume,
    free_tcp_port,
    running_plugin,
)

NODE_ID = "bench-node"
GiB = 1 << 30
MiB = 1 << 20
STAGE_SIZE = GiB
CONCURRENT_SIZE = 128 * MiB
CONCURRENT_STAGES = 32
# 32 servers starting at once on two TCG vCPUs take minutes: both sides wait this long
# for a server (ours through the StorageClass parameter podReadyTimeoutSeconds).
CONCURRENT_READY_TIMEOUT_S = 600
# A failed NodeStage is retried by the CO; the wall time runs until all are staged.
STAGE_ATTEMPTS = 3
RPC_TIMEOUT_S = 600.0
# -- the benchmarks ---------------------------------------------------------------------------


def _plugin(
    workdir: Path, zerofs_command: str, workers: int = 16, s3: S3Storage | None = None
) -> PluginProcess:
    """Ours, as users run it, with its metrics (the stage durations) on a loopback port."""
    return PluginProcess(
        workdir,
        zerofs_command=zerofs_command,
        s3=s3,
        node_id=NODE_ID,
        metrics_address=f"127.0.0.1:{free_tcp_port()}",
        log_level="warning",
        extra_args=("--workers", str(workers)),
    )


STAGE_SAMPLES = ("fresh", "existing", "unstage")


def bench_stage(
    zerofs_command: str,
    cycles: int,
    warmup: int,
    fs_type: str = "ext4",
    s3: S3Storage | None = None,
) -> list[Comparison]:
    """stage_fresh, stage_existing and unstage, with and without the server's start and
    stop: ours over gRPC against the Go sequence, interleaved cycle by cycle (each cycle
    a new volume on each side)."""
    require_tools("nbd-client", "blkid", f"mkfs.{fs_type}", "mount", "umount", "truncate")
    # (side, sample, with server?) -> milliseconds
    samples: dict[tuple[str, str, bool], list[float]] = {
        (side, name, whole): []
        for side in ("ours", "go")
        for name in STAGE_SAMPLES
        for whole in (True, False)
    }
    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        workdir = Path(tmp)
        reservations = DeviceReservations(workdir / "go" / "reservations")
        (workdir / "go" / "store").mkdir(parents=True)
        with running_plugin(_plugin(workdir / "ours", zerofs_command, s3=s3)) as plugin:

            def keep(side: str, name: str, whole_ms: float, server_ms: float) -> None:
                samples[(side, name, True)].append(whole_ms)
                samples[(side, name, False)].append(whole_ms - server_ms)

            def ours(i: int, record: bool) -> None:
                volume = create_volume(
                    plugin, plugin.workdir, fs_type, STAGE_SIZE, name=f"bench-{i}"
                )
                vid = volume.volume_id
                for name, action, operation, server_stage in (
                    ("fresh", volume.stage, "stage", "ensure_server"),
                    ("unstage", volume.unstage, "unstage", "remove_server"),
                    ("existing", volume.stage, "stage", "ensure_server"),
                    ("unstage", volume.unstage, "unstage", "remove_server"),
                ):
                    before = plugin.stage_seconds(operation, server_stage, vid)
                    with timer.measure():
                        action()
                    server = plugin.stage_seconds(operation, server_stage, vid) - before
                    if record:
                        keep("ours", name, timer.ms, server * 1000)
                volume.delete()

            def go(i: int, record: bool) -> None:
                volume = GoStyleVolume(
                    workdir / "go",
                    f"go-bench-{i}",
                    STAGE_SIZE,
                    fs_type,
                    reservations,
                    zerofs_command,
                    s3=s3,
                )
                try:
                    for name, action in (
                        ("fresh", volume.stage),
                        ("unstage", volume.unstage),
                        ("existing", volume.stage),
                        ("unstage", volume.unstage),
                    ):
                        with timer.measure():
                            action()
                        if record:
                            keep("go", name, timer.ms, volume.server_seconds * 1000)
                finally:
                    volume.unstage()

            for i in range(warmup + cycles):
                order = [ours, go] if i % 2 == 0 else [go, ours]
                for contender in order:
                    contender(i, i >= warmup)
    baseline = "go-driver execs"  # the sequence in this module's docstring
    names = {"fresh": "stage_fresh", "existing": "stage_existing", "unstage": "unstage"}
    comparisons = []
    for whole in (False, True):
        for sample, name in names.items():
            comparisons.append(
                Comparison(
                    name + ("_total" if whole else ""),
                    "ms",
                    samples[("ours", sample, whole)],
                    baseline,
                    samples[("go", sample, whole)],
                )
            )
    return comparisons


@dataclass
class ConcurrentComparison(Comparison):
    """A Comparison that also reports failed attempts and calls that never succeeded."""

    ours_failures: int = 0
    baseline_failures: int = 0
    ours_unfinished: int = 0
    baseline_unfinished: int = 0

    def result(self) -> dict[str, object]:
        result = super().result()
        result["failures"] = {"ours": self.ours_failures, "baseline": self.baseline_failures}
        result["unfinished"] = {
            "ours": self.ours_unfinished,
            "baseline": self.baseline_unfinished,
        }
        return result


def bench_concurrent_stage(
    zerofs_command: str, count: int = CONCURRENT_STAGES, fs_type: str = "ext4"
) -> list[Comparison]:
    """``count`` NodeStage calls of fresh volumes at once against ``count`` Go sequences
    run at once from threads: wall time until the last is staged (each retried up to
    ``STAGE_ATTEMPTS`` times, as the CO retries), failed attempts, and calls that never
    succeeded."""
    require_tools("nbd-client", "blkid", f"mkfs.{fs_type}")
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        workdir = Path(tmp)
        with running_plugin(_plugin(workdir / "ours", zerofs_command, workers=count)) as plugin:
            volumes = [
                create_volume(
                    plugin,
                    plugin.workdir,
                    fs_type,
                    CONCURRENT_SIZE,
                    name=f"conc-{i}",
                    parameters={"podReadyTimeoutSeconds": str(CONCURRENT_READY_TIMEOUT_S)},
                )
                for i in range(count)
            ]
            ours = run_all(
                [functools.partial(v.stage, timeout=RPC_TIMEOUT_S) for v in volumes],
                STAGE_ATTEMPTS,
            )
            run_all([functools.partial(v.unstage, timeout=RPC_TIMEOUT_S) for v in volumes])
            for volume in volumes:
                volume.delete(timeout=RPC_TIMEOUT_S)
        reservations = DeviceReservations(workdir / "go" / "reservations")
        (workdir / "go" / "store").mkdir(parents=True)
        go_volumes = [
            GoStyleVolume(
                workdir / "go",
                f"go-conc-{i}",
                CONCURRENT_SIZE,
                fs_type,
                reservations,
                zerofs_command,
                ready_timeout_s=CONCURRENT_READY_TIMEOUT_S,
            )
            for i in range(count)
        ]
        # A failed Go sequence leaves what it did; the Go driver unwinds before retrying.
        go = run_all([v.stage for v in go_volumes], STAGE_ATTEMPTS, [v.unstage for v in go_volumes])
        run_all([v.unstage for v in go_volumes])
    for side, outcome in (("ours", ours), ("go-driver sequences", go)):
        print(
            f"stage_concurrent_{count}: {side}: {count - outcome.unfinished} of {count} staged "
            f"in {outcome.wall_s:.1f} s, {len(outcome.errors)} failed attempts"
            + (f":\n{summarize(outcome.errors)}" if outcome.errors else "")
        )
    comparison = ConcurrentComparison(
        f"stage_concurrent_{count}",
        "s",
        [ours.wall_s],
        f"{count} go sequences",
        [go.wall_s],
        ours_failures=len(ours.errors),
        baseline_failures=len(go.errors),
        ours_unfinished=ours.unfinished,
        baseline_unfinished=go.unfinished,
    )
    return [comparison]


@dataclass
class Outcome:
    """How a batch of concurrent actions went."""

    wall_s: float
    errors: list[str]  # one per failed attempt
    unfinished: int  # actions that failed every attempt


def run_all(
    actions: Sequence[Callable[[], object]],
    attempts: int = 1,
    cleanup: Sequence[Callable[[], object]] | None = None,
) -> Outcome:
    """Start every action at once from its own thread, each retried (after its cleanup)
    up to ``attempts`` times as a CO retries a failed NodeStage."""
    errors: list[str] = []
    unfinished = 0
    lock = threading.Lock()
    start = threading.Barrier(len(actions) + 1)

    def one(index: int) -> None:
        nonlocal unfinished
        start.wait()
        for _attempt in range(attempts):
            try:
                actions[index]()
                return
            except grpc.RpcError as exc:
                message = f"{exc.code().name}: {exc.details()}"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                message = f"{type(exc).__name__}: {exc}"
            with lock:
                errors.append(message)
            if cleanup is not None:
                with contextlib.suppress(grpc.RpcError, OSError, RuntimeError):
                    cleanup[index]()
        with lock:
            unfinished += 1

    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        futures = [pool.submit(one, index) for index in range(len(actions))]
        start.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - started
    return Outcome(wall, errors, unfinished)


def summarize(errors: list[str]) -> str:
    """Distinct errors (volume names and numbers masked) with their counts, most
    frequent first, each shown with the end of one full message."""
    counts: dict[str, int] = {}
    example: dict[str, str] = {}
    for message in errors:
        key = re.sub(r"\d+", "N", message.splitlines()[0])[:160]
        counts[key] = counts.get(key, 0) + 1
        example.setdefault(key, message)
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return "\n".join(
        f"    {n}x {key}\n      e.g. ...{example[key][-400:]}" for key, n in ordered[:4]
    )


# The node benchmarks run the ZeroFS stand-in, not the bench's nbdkit: no server threads.
BENCHMARKS: dict[str, Benchmark] = {
    "stage": lambda run: bench_stage(run.zerofs_command, run.cycles, run.warmup, s3=run.s3),
    "concurrent_stage": lambda run: bench_concurrent_stage(run.zerofs_command),
}
