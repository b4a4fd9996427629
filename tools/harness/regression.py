"""NBD regression cycles through the CSI gRPC API, optionally with chaos.

    python tools/harness/regression.py [--iterations N] [--chaos] [--seed S] [--events K]

Needs the kernel's NBD driver and root: ``make nbd-regression`` runs it in the microVM.
One plugin (both roles, local backend, the ZeroFS stand-in) and one volume; every
iteration stages, publishes, verifies every file written so far (read through the freshly
attached device), writes a new file (fsync after each MiB), unpublishes and unstages.
After each iteration the connected NBD devices (``/sys/block/nbd*/pid``), the volume
server processes and the mounts under the work directory are back to their baseline.

With ``--chaos``, ``--events`` faults are drawn from the seed (printed, so a failing run
can be replayed): kill -9 of the node plugin (restarted at once), kill -9 of the volume
server (its supervisor restarts it and the plugin reconnects the device), or deletion of
the server's sockets, at a random point of a random iteration, during an RPC or a write
or between steps. The operations after a fault are retried on ABORTED and UNAVAILABLE
for a bounded time, as the CO would, and must then succeed; every fsync'd MiB must read
back intact. Results go to ``build/harness/regression.json`` (or ``regression-chaos``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_RETRY_BOUND_S,
    SYNC_WRITES,
    MiB,
    block,
    call_with_retry,
    check,
    kill_server,
    plugin_process,
    run_and_close,
    verify_file,
    write_results,
)

from zerofs_csi.bench.plugin import (  # noqa: E402
    RPC_TIMEOUT_S,
    SECRETS,
    clean_up_volumes,
    connected_nbd_devices,
    create_volume,
    mounts_under,
    stop_plugin,
)
from zerofs_csi.csi import csi_pb2  # noqa: E402

KILL_PLUGIN = "kill -9 node plugin"
KILL_SERVER = "kill -9 volume server"
DELETE_SOCKETS = "delete server sockets"
ALL_FAULTS = (KILL_PLUGIN, KILL_SERVER, DELETE_SOCKETS)
# Where a fault may strike, and which faults make sense there. "during" points fire
# while the RPC or the writer is running, after a random part of its expected time.
POINTS: dict[str, tuple[str, ...]] = {
    "during NodeStage": (KILL_PLUGIN,),
    "after NodeStage": ALL_FAULTS,
    "during write": ALL_FAULTS,
    "after write": ALL_FAULTS,
    "after NodeUnpublish": ALL_FAULTS,
    "during NodeUnstage": (KILL_PLUGIN,),
}
# CI leaves a server kill under the writer to tests/privileged/test_node_reconnect.py and
# the chaos test, which check exactly that.
SERVER_KILL_UNDER_WRITER = ("during write", KILL_SERVER)
# A writer whose server was killed waits for the restart and the reconnect; requests in
# flight are resent at the kernel's next look after it (zerofs_csi.nbd.REQUEUE_TICK_MS).
WRITER_TIMEOUT_S = 400.0


@dataclass
class Fault:
    iteration: int
    point: str
    kind: str
    detail: str = ""
    recovered_in_s: float | None = None


@dataclass
class Cycle:
    iteration: int
    seconds: dict[str, float] = field(default_factory=dict)
    verified_mib: int = 0
    written_mib: int = 0


def draw_faults(
    rng: random.Random,
    iterations: int,
    count: int,
    excluded: frozenset[tuple[str, str]] = frozenset(),
) -> list[Fault]:
    """``count`` faults; every kind comes up once before any comes up again. ``excluded``
    lists (point, kind) pairs not to draw."""
    kinds: list[str] = []
    while len(kinds) < count:
        kinds += rng.sample(ALL_FAULTS, len(ALL_FAULTS))
    faults = []
    for kind in kinds[:count]:
        point = rng.choice(
            [p for p, allowed in POINTS.items() if kind in allowed and (p, kind) not in excluded]
        )
        faults.append(Fault(rng.randrange(iterations), point, kind))
    faults.sort(key=lambda f: (f.iteration, list(POINTS).index(f.point)))
    return faults


class Writer(threading.Thread):
    """Writes ``mib`` MiB to ``path``, fsync after each; ``synced`` counts durable MiB."""

    def __init__(self, path: Path, seed: int, name: str, mib: int) -> None:
        super().__init__(name=f"writer-{name}", daemon=True)
        self.path, self.seed, self.file_name, self.mib = path, seed, name, mib
        self.synced = 0
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                for index in range(self.mib):
                    os.pwrite(fd, block(self.seed, self.file_name, index), index * MiB)
                    os.fsync(fd)
                    self.synced = index + 1
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


class Regression:
    def __init__(
        self,
        workdir: Path,
        iterations: int,
        seed: int,
        faults: list[Fault],
        fs_type: str = "ext4",
        data_mib: int = 4,
        retry_bound_s: float = DEFAULT_RETRY_BOUND_S,
        log: Callable[[str], None] = print,
    ) -> None:
        self.workdir = workdir
        self.iterations = iterations
        self.seed = seed
        self.faults = faults
        self.fs_type = fs_type
        self.data_mib = data_mib
        self.retry_bound_s = retry_bound_s
        self.log = log
        self.rng = random.Random(seed ^ 0x5EED)
        self.plugin = plugin_process(workdir)
        self.files: dict[str, int] = {}  # name -> MiB written and fsync'd
        self.cycles: list[Cycle] = []
        self.retried: list[str] = []
        self.expected_s = {"NodeStage": 2.0, "NodeUnstage": 1.0}
        self.volume: Any = None
        self.baseline_devices: set[int] = set()

    # -- outside view ---------------------------------------------------------------

    def check_baseline(self, when: str) -> None:
        devices = connected_nbd_devices()
        check(
            devices == self.baseline_devices,
            f"{when}: connected NBD devices {sorted(devices)}, baseline "
            f"{sorted(self.baseline_devices)}",
        )
        servers = self.plugin.server_processes()
        check(not servers, f"{when}: volume server processes left: {servers}")
        mounted = mounts_under(self.workdir / "kubelet") + mounts_under(self.workdir / "pods")
        check(not mounted, f"{when}: mounts left: {mounted}")

    # -- faults ---------------------------------------------------------------------

    def faults_at(self, iteration: int, point: str) -> list[Fault]:
        return [f for f in self.faults if f.iteration == iteration and f.point == point]

    def strike(self, fault: Fault) -> None:
        started = time.monotonic()
        if fault.kind == KILL_PLUGIN:
            self.plugin.kill9()
            self.plugin.start()  # returns once Probe is ready: recovery has run
            fault.detail = f"plugin restarted (start {self.plugin.starts})"
        elif fault.kind == KILL_SERVER:
            pid = kill_server(self.volume)
            fault.detail = f"server {pid} killed" if pid else "no server was running"
        else:
            sockets = self.plugin.state_dir / "sockets" / self.volume.volume_id
            removed = []
            for path in sorted(sockets.glob("*.sock")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path.name)
            fault.detail = f"removed {removed}" if removed else "no socket to remove"
        fault.recovered_in_s = round(time.monotonic() - started, 3)
        self.log(
            f"  chaos: {fault.kind} {fault.point} (iteration {fault.iteration}): {fault.detail}"
        )

    def strike_at(self, iteration: int, point: str) -> None:
        for fault in self.faults_at(iteration, point):
            self.strike(fault)

    def rpc_with_faults(
        self, iteration: int, name: str, rpc: Callable[[], object], cycle: Cycle
    ) -> None:
        """Run an RPC; a fault planned "during" it strikes while it runs, after which the
        RPC is retried (its first attempt may have failed or been cut off)."""
        started = time.monotonic()
        planned = self.faults_at(iteration, f"during {name}")
        if not planned:
            call_with_retry(name, rpc, self.retry_bound_s, self.retried)
            self.expected_s[name] = time.monotonic() - started
        else:
            done = threading.Event()

            def first_attempt() -> None:
                with contextlib.suppress(grpc.RpcError):
                    rpc()
                done.set()

            thread = threading.Thread(target=first_attempt, daemon=True)
            thread.start()
            for fault in planned:
                done.wait(self.rng.uniform(0.0, self.expected_s[name]))
                self.strike(fault)
            thread.join(self.retry_bound_s)
            call_with_retry(name, rpc, self.retry_bound_s, self.retried)
        cycle.seconds[name] = round(time.monotonic() - started, 3)

    # -- the run --------------------------------------------------------------------

    def write_file(self, iteration: int, target: Path, cycle: Cycle) -> None:
        name = f"data-{iteration:04d}.bin"
        writer = Writer(target / name, self.seed, name, self.data_mib)
        started = time.monotonic()
        writer.start()
        for fault in self.faults_at(iteration, "during write"):
            deadline = time.monotonic() + 120
            while writer.synced < 1 and writer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.strike(fault)
        writer.join(WRITER_TIMEOUT_S)
        check(not writer.is_alive(), f"writer stuck after {writer.synced} MiB of {name}")
        check(
            writer.error is None, f"I/O error after {writer.synced} MiB of {name}: {writer.error}"
        )
        self.files[name] = writer.synced
        cycle.written_mib = writer.synced
        cycle.seconds["write"] = round(time.monotonic() - started, 3)

    def verify_all(self, target: Path, cycle: Cycle) -> None:
        started = time.monotonic()
        for name, mib in self.files.items():
            verify_file(target / name, self.seed, name, mib)
            cycle.verified_mib += mib
        cycle.seconds["verify"] = round(time.monotonic() - started, 3)

    def cycle(self, iteration: int, final: bool = False) -> Cycle:
        cycle = Cycle(iteration)
        volume = self.volume
        target = self.workdir / "pods" / f"pod-{iteration}" / "volume"

        self.rpc_with_faults(iteration, "NodeStage", volume.stage, cycle)
        self.strike_at(iteration, "after NodeStage")
        call_with_retry(
            "NodePublish", lambda: volume.publish(str(target)), self.retry_bound_s, self.retried
        )
        self.verify_all(target, cycle)
        if not final:
            self.write_file(iteration, target, cycle)
            self.strike_at(iteration, "after write")
        call_with_retry(
            "NodeUnpublish", lambda: volume.unpublish(str(target)), self.retry_bound_s, self.retried
        )
        volume.targets.remove(str(target))
        self.strike_at(iteration, "after NodeUnpublish")
        self.rpc_with_faults(iteration, "NodeUnstage", volume.unstage, cycle)
        self.check_baseline(f"after iteration {iteration}")
        return cycle

    def run(self) -> None:
        self.plugin.start()
        self.baseline_devices = connected_nbd_devices()
        self.check_baseline("at start")
        self.volume = create_volume(
            self.plugin, self.workdir, fs_type=self.fs_type, size=256 * MiB, parameters=SYNC_WRITES
        )
        self.log(
            f"regression: {self.iterations} iterations, seed {self.seed}, volume "
            f"{self.volume.volume_id} ({self.fs_type}), {len(self.faults)} faults"
        )
        for fault in self.faults:
            self.log(f"  planned: iteration {fault.iteration}: {fault.kind} {fault.point}")
        for iteration in range(self.iterations):
            cycle = self.cycle(iteration)
            self.cycles.append(cycle)
            self.log(
                f"iteration {iteration}: ok, verified {cycle.verified_mib} MiB, wrote "
                f"{cycle.written_mib} MiB; "
                + ", ".join(f"{k} {v:.2f} s" for k, v in cycle.seconds.items())
            )
        final = self.cycle(self.iterations, final=True)
        self.cycles.append(final)
        self.log(f"final check: verified {final.verified_mib} MiB after a last restage")
        call_with_retry("DeleteVolume", self.delete_volume, self.retry_bound_s, self.retried)
        clean_up_volumes(self.plugin)
        self.check_baseline("after DeleteVolume")

    def delete_volume(self) -> object:
        return self.plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=self.volume.volume_id, secrets=SECRETS),
            timeout=RPC_TIMEOUT_S,
        )

    def close(self) -> None:
        stop_plugin(self.plugin)

    def results(self, failure: str | None) -> dict[str, object]:
        return {
            "harness": "nbd-regression",
            "chaos": bool(self.faults),
            "seed": self.seed,
            "iterations": self.iterations,
            "fs_type": self.fs_type,
            "data_mib_per_iteration": self.data_mib,
            "passed": failure is None,
            "failure": failure,
            "completed_iterations": len([c for c in self.cycles if c.iteration < self.iterations]),
            "faults": [asdict(f) for f in self.faults],
            "retried": self.retried,
            "baseline_devices": sorted(self.baseline_devices),
            "cycles": [asdict(c) for c in self.cycles],
            "plugin_log": str(self.plugin.log_path),
        }


def run(
    iterations: int,
    chaos: bool,
    seed: int | None = None,
    events: int | None = None,
    fs_type: str = "ext4",
    data_mib: int = 4,
    workdir: Path | None = None,
    results_name: str | None = None,
    log: Callable[[str], None] = print,
    excluded: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, object]:
    """One harness run; returns its results (also written under build/harness/).
    ``excluded``: (point, kind) pairs the chaos must not draw."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
    count = (events if events is not None else max(1, iterations // 2)) if chaos else 0
    faults = draw_faults(random.Random(seed), iterations, count, excluded)
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="zerofs-regression-"))
    regression = Regression(workdir, iterations, seed, faults, fs_type, data_mib, log=log)
    failure: str | None = None
    try:
        failure = run_and_close(regression)
    finally:
        results = regression.results(failure)
        name = results_name or ("regression-chaos" if chaos else "regression")
        log_copy = workdir / "plugin.log"
        path = write_results(name, results)
        if log_copy.exists():
            shutil.copy(log_copy, path.with_suffix(".plugin.log"))
            results["plugin_log"] = str(path.with_suffix(".plugin.log"))
            write_results(name, results)
        if own_workdir and failure is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        log(f"regression: FAILED (seed {seed}): {failure}")
        log(f"--- last lines of the plugin log ({results['plugin_log']}) ---")
        log(regression.plugin.log_tail(40))
    else:
        log(f"regression: OK: {iterations} iterations, {len(faults)} faults, seed {seed}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=int(os.environ.get("ITERATIONS", 20)))
    parser.add_argument(
        "--chaos",
        action="store_true",
        default=os.environ.get("CHAOS", "") not in ("", "0"),
        help="inject faults (also CHAOS=1)",
    )
    parser.add_argument("--seed", type=int, default=None, help="replay the faults of a run")
    parser.add_argument("--events", type=int, default=None, help="faults (default: iterations/2)")
    parser.add_argument("--fs-type", default="ext4", choices=("ext4", "xfs", "btrfs"))
    parser.add_argument("--data-mib", type=int, default=4, help="MiB written per iteration")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.data_mib < 1 or (args.events is not None and args.events < 0):
        parser.error("--iterations and --data-mib must be positive, --events not negative")
    results = run(args.iterations, args.chaos, args.seed, args.events, args.fs_type, args.data_mib)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
