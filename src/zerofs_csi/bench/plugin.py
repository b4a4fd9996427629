"""The plugin as a user runs it (``python -m zerofs_csi --role all --backend local``),
driven over its CSI socket: the benchmarks' harness, which the privileged tests and the
regression, chaos and soak harnesses (tools/harness) drive the node with too.

It ships with the package so that ``python -m zerofs_csi.bench`` runs from an installed
wheel: the ZeroFS command is a parameter (``zerofs`` on PATH by default; a checkout's
tests, benchmarks and harnesses pass what ``zerofs_server`` chooses: ZeroFS when there is
one, else the stand-in, tools/zerofs-standin).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.host import mounts
from zerofs_csi.host.unix_socket import accepts

MiB = 1 << 20
NODE_ID = "test-node"
SECRETS = {"ZEROFS_ENCRYPTION_PASSWORD": "node-test-encryption-password"}
# Plugin start (imports over 9p under TCG) and recovery can take a while in the microVM.
READY_TIMEOUT_S = 120.0
RPC_TIMEOUT_S = 300.0
PLUGIN_EXIT_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 60

Mode = csi_pb2.VolumeCapability.AccessMode
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """``condition()``'s first true value, polled every ``interval`` seconds; TimeoutError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_tcp_port() -> int:
    """A loopback TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mount_capability(
    fs_type: str = "",
    flags: tuple[str, ...] = (),
    mode: csi_pb2.VolumeCapability.AccessMode.Mode = Mode.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_capability(
    mode: csi_pb2.VolumeCapability.AccessMode.Mode = Mode.SINGLE_NODE_WRITER,
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


# -- what the node looks like from outside -------------------------------------------


def connected_nbd_devices() -> set[int]:
    """Indexes of NBD devices the kernel has connected (``/sys/block/nbdN/pid`` exists)."""
    found = set()
    for entry in Path("/sys/block").glob("nbd*"):
        if entry.name[3:].isdigit() and (entry / "pid").exists():
            found.add(int(entry.name[3:]))
    return found


def mounts_under(directory: Path) -> list[str]:
    root = os.path.realpath(directory)
    return [
        e.mountpoint
        for e in mounts.mountinfo()
        if e.mountpoint == root or e.mountpoint.startswith(root + "/")
    ]


def processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    """Processes (other than this one) whose command line contains one of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in argv for needle in needles):
            found.append((int(entry.name), argv.strip()))
    return found


# -- the plugin ---------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Storage:
    """A bucket the volumes live in instead of ``file://`` under the work directory:
    ZeroFS 2.3 refuses ``file://`` for a writable server (its local store has no
    conditional put, which its fencing needs)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def parameters(self, prefix: str) -> dict[str, str]:
        """StorageClass parameters of a volume under ``<bucket>/<prefix>``."""
        return {
            "storageUrl": f"s3://{self.bucket}/{prefix}",
            "s3Endpoint": self.endpoint,
            "s3AllowHttp": str(self.endpoint.startswith("http://")).lower(),
            "s3Region": self.region,
        }

    def secrets(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


@dataclass
class PluginProcess:
    """``python -m zerofs_csi`` with the local backend under ``workdir``."""

    workdir: Path
    zerofs_command: str = "zerofs"
    s3: S3Storage | None = None  # None: file:// under ``store``
    node_id: str = NODE_ID
    metrics_address: str = ""
    log_level: str = "debug"
    extra_args: tuple[str, ...] = ()
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    channel: grpc.Channel | None = field(default=None, repr=False)
    volumes: list[Volume] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "csi.sock"

    @property
    def store(self) -> Path:
        return self.workdir / "store"

    def storage_parameters(self) -> dict[str, str]:
        """The StorageClass parameters that place this plugin's volumes."""
        if self.s3 is None:
            return {"storageUrl": f"file://{self.store}"}
        return self.s3.parameters(self.workdir.name)

    @property
    def secrets(self) -> dict[str, str]:
        """The CSI secrets of this plugin's volumes."""
        return {**SECRETS, **(self.s3.secrets() if self.s3 is not None else {})}

    @property
    def log_path(self) -> Path:
        return self.workdir / "plugin.log"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "zerofs_csi",
            "--role", "all", "--backend", "local",
            "--zerofs-command", self.zerofs_command,
            "--state-dir", str(self.state_dir),
            "--endpoint", f"unix://{self.socket_path}",
            "--node-id", self.node_id,
            "--metrics-address", self.metrics_address,
            "--log-format", "text", "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait_ready: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "plugin already running"
        self.store.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"==== plugin start {self.starts} ====\n".encode())
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._connect()
        if wait_ready:
            self.wait_ready()

    def _connect(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not accepts(self.socket_path):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"plugin did not listen in time:\n{self.log_tail()}")
            time.sleep(0.05)
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(f"unix://{self.socket_path}")

    def ready(self) -> bool:
        try:
            reply = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
        except grpc.RpcError as exc:
            # A plugin that is still starting up can refuse the first connections.
            if exc.code() != grpc.StatusCode.UNAVAILABLE or not self.running:
                raise
            return False
        return bool(reply.ready.value)

    def wait_ready(self) -> None:
        wait_until(self.ready, READY_TIMEOUT_S, "the plugin's Probe to report ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the plugin's process group (the plugin and a mkfs it runs), as when
        the node plugin's container dies. Volume servers run in their own sessions."""
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            # A plugin inside an unmount whose writes went to a server that died is in
            # uninterruptible sleep until they are sent again on a reconnected device:
            # it dies after that.
            self.proc.wait(timeout=PLUGIN_EXIT_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no plugin log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    def server_processes(self) -> list[tuple[int, str]]:
        """Volume server processes (ZeroFS, or the stand-in and its nbdkit/diod)."""
        return processes_mentioning(str(self.state_dir / "servers"), str(self.store))

    def metric(self, sample_name: str, **labels: str) -> float:
        """The sum of the plugin's samples ``sample_name`` (a counter's ``_total``, a
        histogram's ``_sum``) whose labels include ``labels``; 0 when there are none
        (needs ``metrics_address``)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
        return sum(
            float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == sample_name
            and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def stage_seconds(self, operation: str, stage: str, volume_id: str) -> float:
        """Total time the plugin spent in one stage of an operation on a volume, from its
        ``zerofs_csi_stage_duration_seconds`` histogram."""
        return self.metric(
            "zerofs_csi_stage_duration_seconds_sum",
            operation=operation,
            stage=stage,
            volume_id=volume_id,
        )


# -- volumes --------------------------------------------------------------------------------


@dataclass
class Volume:
    plugin: PluginProcess
    volume_id: str
    context: dict[str, str]
    fs_type: str
    staging: str
    capability: csi_pb2.VolumeCapability
    targets: list[str] = field(default_factory=list)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return self.plugin.node

    def stage_request(
        self, capability: csi_pb2.VolumeCapability | None = None
    ) -> csi_pb2.NodeStageVolumeRequest:
        return csi_pb2.NodeStageVolumeRequest(
            volume_id=self.volume_id,
            staging_target_path=self.staging,
            volume_capability=capability or self.capability,
            volume_context=self.context,
            secrets=self.plugin.secrets,
        )

    def stage(
        self, capability: csi_pb2.VolumeCapability | None = None, timeout: float = RPC_TIMEOUT_S
    ) -> csi_pb2.NodeStageVolumeResponse:
        return self.node.NodeStageVolume(self.stage_request(capability), timeout=timeout)

    def unstage(self, timeout: float = RPC_TIMEOUT_S) -> csi_pb2.NodeUnstageVolumeResponse:
        return self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=self.volume_id, staging_target_path=self.staging
            ),
            timeout=timeout,
        )

    def publish(
        self,
        target: str,
        readonly: bool = False,
        capability: csi_pb2.VolumeCapability | None = None,
    ) -> csi_pb2.NodePublishVolumeResponse:
        if target not in self.targets:
            self.targets.append(target)
        return self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=self.volume_id,
                staging_target_path=self.staging,
                target_path=target,
                volume_capability=capability or self.capability,
                volume_context=self.context,
                readonly=readonly,
            ),
            timeout=RPC_TIMEOUT_S,
        )

    def unpublish(self, target: str) -> csi_pb2.NodeUnpublishVolumeResponse:
        return self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=self.volume_id, target_path=target),
            timeout=RPC_TIMEOUT_S,
        )

    def stats(self, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=self.volume_id, volume_path=path, staging_target_path=self.staging
            ),
            timeout=RPC_TIMEOUT_S,
        )

    def delete(self, timeout: float = RPC_TIMEOUT_S) -> csi_pb2.DeleteVolumeResponse:
        return self.plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=self.volume_id, secrets=self.plugin.secrets),
            timeout=timeout,
        )

    def record(self) -> dict[str, object]:
        return dict(json.loads((Path(self.staging) / "zerofs-volume.json").read_text()))

    def record_or_none(self) -> dict[str, object] | None:
        try:
            return self.record()
        except FileNotFoundError:
            return None

    def server_processes(self) -> list[tuple[int, str]]:
        """The volume's server, whose command line names its config."""
        return processes_mentioning(str(self.plugin.state_dir / "servers" / self.volume_id) + "/")

    def server_pid(self) -> int | None:
        """The pid of the volume's one server (ZeroFS, or the stand-in, a process group
        leader); None while there is none, or more than one."""
        found = [pid for pid, argv in self.server_processes() if "zerofs" in argv]
        return found[0] if len(found) == 1 else None

    def device(self) -> str:
        return f"/dev/nbd{self.record()['device_index']}"

    def server_log_path(self) -> Path:
        """The volume server's stdout and stderr (the local backend's ``server.log``)."""
        return self.plugin.state_dir / "servers" / self.volume_id / "server.log"

    def cleanup(self) -> None:
        """Unpublish, unstage and delete, ignoring what is already gone."""
        for target in self.targets:
            with contextlib.suppress(grpc.RpcError):
                self.unpublish(target)
        with contextlib.suppress(grpc.RpcError):
            self.unstage()
        with contextlib.suppress(grpc.RpcError):
            self.delete()


_names = itertools.count(1)

VolumeFactory = Callable[..., Volume]


def create_volume(
    plugin: PluginProcess,
    workdir: Path,
    fs_type: str = "ext4",
    size: int = 256 * MiB,
    block: bool = False,
    name: str = "",
    mount_flags: tuple[str, ...] = (),
    parameters: dict[str, str] | None = None,
) -> Volume:
    name = name or f"pvc-{os.getpid()}-{next(_names)}"
    capability = block_capability() if block else mount_capability(fs_type, mount_flags)
    created = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability],
            parameters={
                **plugin.storage_parameters(),
                "filesystem": fs_type,
                **(parameters or {}),
            },
            secrets=plugin.secrets,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    vid = created.volume.volume_id
    volume = Volume(
        plugin=plugin,
        volume_id=vid,
        context=dict(created.volume.volume_context),
        fs_type="" if block else fs_type,
        staging=str(workdir / "kubelet" / "staging" / vid),
        capability=capability,
    )
    plugin.volumes.append(volume)
    return volume


def clean_up_volumes(plugin: PluginProcess) -> None:
    """Unpublish, unstage and delete every volume made on ``plugin``."""
    if not plugin.volumes:
        return
    if not plugin.running:
        plugin.start()
    while plugin.volumes:
        plugin.volumes.pop().cleanup()


def stop_plugin(plugin: PluginProcess) -> None:
    try:
        clean_up_volumes(plugin)
    finally:
        plugin.stop()
        # The volume servers, and the link keeper the plugin started (both outlive it).
        keeper = f"zerofs_csi.link_keeper --state-dir {plugin.state_dir} "
        for pid, _ in plugin.server_processes() + processes_mentioning(keeper):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_plugin(plugin: PluginProcess) -> Iterator[PluginProcess]:
    """``plugin`` started, and stopped with everything it left running."""
    try:
        plugin.start()
        yield plugin
    finally:
        stop_plugin(plugin)
