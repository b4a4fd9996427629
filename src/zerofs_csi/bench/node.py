"""Node benchmarks: NodeStage and NodeUnstage through the CSI API against the Go driver's
exec sequence, and 32 NodeStage calls at once.

Ours is the plugin as users run it (``python -m zerofs_csi --role all --backend local``
with the ZeroFS stand-in, or ``zerofs`` when it is on PATH), driven over gRPC. The
baseline does what the Go driver's node does for the same volume (seed-driver.md,
"Attach" and "Detach"), against the same server program and storage, in the same VM:

stage: start the volume's server and wait for its 9P socket, mount 9P in the kernel,
``truncate`` the export file ``.nbd/disk`` if it is missing, unmount 9P, reserve a free
device (an O_EXCL file), ``nbd-client -unix SOCK -N disk -persist -timeout 0
-connections 4 /dev/nbdX``, ``blkid`` the device, ``mkfs.<fs>`` with its defaults when
it holds no filesystem, ``mount``.
unstage: ``umount``, ``nbd-client -d``, stop the server, drop the reservation.

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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from zerofs_csi.bench.measure import Comparison, Timer
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.host import mounts
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.settings import StorageUrl, VolumeSecrets, VolumeSettings

REPO = Path(__file__).resolve().parents[3]
NODE_ID = "bench-node"
SECRETS = {"ZEROFS_ENCRYPTION_PASSWORD": "bench-encryption-password"}
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
START_TIMEOUT_S = 120.0
# The Go driver's export file and nbd-client flags (seed-driver.md, "Attach").
GO_EXPORT = "disk"
GO_NBD_CLIENT_FLAGS = ("-persist", "-timeout", "0", "-connections", "4")
# The kernel's 9P client over the server's unix socket. It attaches as "nobody" unless
# told otherwise, which the stand-in's diod cannot look up: attach as root.
GO_9P_OPTIONS = "trans=unix,version=9p2000.L,uname=root,access=any"


def zerofs_command() -> str:
    found = shutil.which("zerofs")
    if found:
        return found
    standin = REPO / "tools" / "zerofs-standin"
    if not standin.exists():
        raise SystemExit(f"neither zerofs on PATH nor the stand-in {standin}")
    return str(standin)


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (apt-get install them)")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_quiet(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; with ``check``, a failure raises RuntimeError with its stderr."""
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    if check and done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {stderr}")
    return done


# -- ours: the plugin over gRPC ---------------------------------------------------------


@dataclass
class Plugin:
    workdir: Path
    workers: int = 16
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    metrics_port: int = field(default_factory=lambda: free_tcp_port())

    @property
    def socket_path(self) -> Path:
        return self.workdir / "csi.sock"

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "zerofs_csi",
            "--role", "all", "--backend", "local", "--node-id", NODE_ID,
            "--endpoint", f"unix://{self.socket_path}",
            "--state-dir", str(self.workdir / "state"),
            "--zerofs-command", zerofs_command(),
            "--metrics-address", f"127.0.0.1:{self.metrics_port}",
            "--log-format", "text", "--log-level", "warning",
            "--workers", str(self.workers),
        ]  # fmt: skip
        with open(self.workdir / "plugin.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(
            lambda: accepts(self.socket_path) or self.proc is None or self.proc.poll() is not None,
            START_TIMEOUT_S,
            "the plugin to listen",
        )
        if self.proc.poll() is not None:
            raise SystemExit(f"the plugin exited; see {self.workdir / 'plugin.log'}")
        self.channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        identity = csi_pb2_grpc.IdentityStub(self.channel)
        wait_until(
            lambda: identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value,
            START_TIMEOUT_S,
            "the plugin to be ready",
        )

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    def stage_seconds(self, operation: str, stage: str, volume_id: str) -> float:
        """Total time the plugin spent in one stage of an operation on a volume, from its
        ``zerofs_csi_stage_duration_seconds`` histogram."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
        wanted = {"operation": operation, "stage": stage, "volume_id": volume_id}
        for family in text_string_to_metric_families(text):
            if family.name != "zerofs_csi_stage_duration_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_sum") and all(
                    sample.labels.get(k) == v for k, v in wanted.items()
                ):
                    return float(sample.value)
        return 0.0

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)


@dataclass
class PluginVolume:
    plugin: Plugin
    volume_id: str
    context: dict[str, str]
    capability: csi_pb2.VolumeCapability
    staging: str

    @classmethod
    def create(
        cls, plugin: Plugin, name: str, size: int, fs_type: str, ready_timeout_s: int = 0
    ) -> PluginVolume:
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        created = plugin.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[capability],
                parameters={
                    "storageUrl": f"file://{plugin.store}",
                    "filesystem": fs_type,
                    **({"podReadyTimeoutSeconds": str(ready_timeout_s)} if ready_timeout_s else {}),
                },
                secrets=SECRETS,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        vid = created.volume.volume_id
        staging = str(plugin.workdir / "staging" / vid)
        return cls(plugin, vid, dict(created.volume.volume_context), capability, staging)

    def stage(self) -> None:
        self.plugin.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=self.volume_id, staging_target_path=self.staging,
                volume_capability=self.capability, volume_context=self.context,
                secrets=SECRETS,
            ),
            timeout=RPC_TIMEOUT_S,
        )  # fmt: skip

    def unstage(self) -> None:
        self.plugin.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=self.volume_id, staging_target_path=self.staging
            ),
            timeout=RPC_TIMEOUT_S,
        )

    def delete(self) -> None:
        self.plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=self.volume_id, secrets=SECRETS),
            timeout=RPC_TIMEOUT_S,
        )


# -- baseline: the Go driver's exec sequence ---------------------------------------------


class DeviceReservations:
    """The Go driver's reservations: a free /dev/nbdX claimed with an O_EXCL file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def reserve(self) -> int:
        for entry in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
            index = int(entry.name[3:])
            if (entry / "pid").exists():
                continue
            try:
                fd = os.open(self.directory / f"nbd{index}", os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            return index
        raise RuntimeError("no free NBD device")

    def release(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"nbd{index}").unlink()


@dataclass
class GoStyleVolume:
    """One volume staged the way the Go driver stages it."""

    workdir: Path
    volume_id: str
    size: int
    fs_type: str
    reservations: DeviceReservations
    server: subprocess.Popen[bytes] | None = None
    device_index: int | None = None
    ready_timeout_s: float = START_TIMEOUT_S
    # How long the last stage waited for the server, or the last unstage stopped it.
    server_seconds: float = 0.0
    sockets: ServerSockets = field(init=False)

    def __post_init__(self) -> None:
        self.sockets = ServerSockets.under(self.workdir / "sockets", self.volume_id)

    @property
    def staging(self) -> Path:
        return self.workdir / "staging" / self.volume_id

    def start_server(self) -> None:
        """The Go driver creates the volume's pod and waits for its 9P socket."""
        settings = VolumeSettings(
            storage_url=StorageUrl.parse(f"file://{self.workdir / 'store'}"),
            filesystem=self.fs_type,
        )
        directory = self.workdir / "servers" / self.volume_id
        directory.mkdir(parents=True, exist_ok=True)
        self.sockets.directory.mkdir(parents=True, exist_ok=True)
        rendered = render_zerofs_config(
            settings,
            self.volume_id,
            VolumeSecrets.from_csi_secrets(SECRETS),
            cache_dir=str(directory / "cache"),
            nbd_socket=str(self.sockets.nbd),
            ninep_socket=str(self.sockets.ninep),
        )
        config = directory / "config.toml"
        config.write_text(rendered.toml_text)
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
        with open(directory / "server.log", "ab") as log:
            self.server = subprocess.Popen(
                [zerofs_command(), "run", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**environment, **dict(rendered.secret_env)},
                start_new_session=True,
            )
        wait_until(
            lambda: accepts(self.sockets.ninep) or self.server_exited(),
            self.ready_timeout_s,
            "the 9P socket",
        )
        if self.server_exited():
            raise RuntimeError(f"server exited; see {directory / 'server.log'}")

    def server_exited(self) -> bool:
        return self.server is None or self.server.poll() is not None

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(60)
        self.server = None

    def create_export(self) -> None:
        """Kernel 9P mount, ``truncate`` the export when missing, unmount."""
        mountpoint = self.workdir / "9p" / self.volume_id
        mountpoint.mkdir(parents=True, exist_ok=True)
        run_quiet(
            ["mount", "-t", "9p", "-o", GO_9P_OPTIONS, str(self.sockets.ninep), str(mountpoint)]
        )  # fmt: skip
        try:
            export = mountpoint / ".nbd" / GO_EXPORT
            if not export.exists():
                export.parent.mkdir(exist_ok=True)
                run_quiet(["truncate", "-s", str(self.size), str(export)])
        finally:
            run_quiet(["umount", str(mountpoint)])

    def stage(self) -> None:
        started = time.perf_counter()
        self.start_server()
        self.server_seconds = time.perf_counter() - started
        self.create_export()
        self.device_index = self.reservations.reserve()
        device = f"/dev/nbd{self.device_index}"
        run_quiet(
            ["nbd-client", "-unix", str(self.sockets.nbd), "-N", GO_EXPORT,
             *GO_NBD_CLIENT_FLAGS, device]
        )  # fmt: skip
        probe = run_quiet(["blkid", "-o", "value", "-s", "TYPE", device], check=False)
        if probe.returncode == 2:  # blkid: nothing found on the device
            run_quiet([f"mkfs.{self.fs_type}", device])
        elif probe.returncode != 0:
            raise RuntimeError(f"blkid {device}: {probe.stderr.decode(errors='replace')}")
        self.staging.mkdir(parents=True, exist_ok=True)
        run_quiet(["mount", "-t", self.fs_type, device, str(self.staging)])

    def unstage(self) -> None:
        entry = mounts.find_mount(str(self.staging))
        if entry is not None:
            run_quiet(["umount", str(self.staging)])
        if self.device_index is not None:
            run_quiet(["nbd-client", "-d", f"/dev/nbd{self.device_index}"])
            self.reservations.release(self.device_index)
            self.device_index = None
        started = time.perf_counter()
        self.stop_server()
        self.server_seconds = time.perf_counter() - started


# -- the benchmarks ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_plugin(workdir: Path, workers: int = 16) -> Iterator[Plugin]:
    plugin = Plugin(workdir, workers=workers)
    try:
        plugin.start()
        yield plugin
    finally:
        plugin.stop()


STAGE_SAMPLES = ("fresh", "existing", "unstage")


def bench_stage(cycles: int, warmup: int, fs_type: str = "ext4") -> list[Comparison]:
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
        with running_plugin(workdir / "ours") as plugin:

            def keep(side: str, name: str, whole_ms: float, server_ms: float) -> None:
                samples[(side, name, True)].append(whole_ms)
                samples[(side, name, False)].append(whole_ms - server_ms)

            def ours(i: int, record: bool) -> None:
                volume = PluginVolume.create(plugin, f"bench-{i}", STAGE_SIZE, fs_type)
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
                    workdir / "go", f"go-bench-{i}", STAGE_SIZE, fs_type, reservations
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
    count: int = CONCURRENT_STAGES, fs_type: str = "ext4"
) -> list[Comparison]:
    """``count`` NodeStage calls of fresh volumes at once against ``count`` Go sequences
    run at once from threads: wall time until the last is staged (each retried up to
    ``STAGE_ATTEMPTS`` times, as the CO retries), failed attempts, and calls that never
    succeeded."""
    require_tools("nbd-client", "blkid", f"mkfs.{fs_type}")
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        workdir = Path(tmp)
        with running_plugin(workdir / "ours", workers=count) as plugin:
            volumes = [
                PluginVolume.create(
                    plugin, f"conc-{i}", CONCURRENT_SIZE, fs_type, CONCURRENT_READY_TIMEOUT_S
                )
                for i in range(count)
            ]
            ours = run_all([v.stage for v in volumes], STAGE_ATTEMPTS)
            run_all([v.unstage for v in volumes])
            for volume in volumes:
                volume.delete()
        reservations = DeviceReservations(workdir / "go" / "reservations")
        (workdir / "go" / "store").mkdir(parents=True)
        go_volumes = [
            GoStyleVolume(
                workdir / "go",
                f"go-conc-{i}",
                CONCURRENT_SIZE,
                fs_type,
                reservations,
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
    actions: list[Callable[[], None]],
    attempts: int = 1,
    cleanup: list[Callable[[], None]] | None = None,
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
BENCHMARKS: dict[str, Callable[[int, int, int], list[Comparison]]] = {
    "stage": lambda cycles, warmup, _threads: bench_stage(cycles, warmup),
    "concurrent_stage": lambda _cycles, _warmup, _threads: bench_concurrent_stage(),
}
