"""End to end through the Kubernetes backend: API objects, a kubelet, a server, NBD.

The backend creates the volume's config Secret and pod on the (fake) API server; a
kubelet stand-in on this node sees the pod, mounts its Secret (config.toml and the
secretKeyRef environment), starts the ZeroFS stand-in (tools/zerofs_standin.py: nbdkit
and diod) from that config under the container's own command (the fence guard), runs
the pod's own readiness probe command against the sockets and marks the pod Ready. Two
tests:

- the backend alone: the export is created over 9P and attached through the kernel's
  NBD driver with nbd-client; the bytes written to the device reach the volume's
  storage; stopping removes the pod;
- the plugin as users run it (``python -m zerofs_csi --backend kubernetes`` with a
  kubeconfig for the API server): CreateVolume, NodeStage (attach, mkfs, mount),
  NodeUnstage (the pod goes), NodeStage again (a new pod, the data is still there).

The stand-in "container runtime" maps the pod's cache emptyDir to a host directory; the
volume's storage is a ``file://`` directory, which the stand-in serves.

Run in the VM with:

    python3 tests/vm/runner.py --timeout 900 -- \
        .venv/bin/pytest -m privileged tests/privileged/test_kube_backend.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
from kube.cluster import DAEMONSET, NODE, Cluster, fake_cluster
from kube.kubelet import KubeletStandIn, MountedPod
from kubernetes import client
from prometheus_client import CollectorRegistry

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.kube.api import call_json
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.servers.ninep import prepare_export
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.pods.backend import KubernetesBackend
from zerofs_csi.servers.pods.owner import resolve_daemonset_owner
from zerofs_csi.servers.pods.status import pod_is_ready
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import parse_volume_settings

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs_standin.py"
VOLUME = "pvc-0e2f4a6c-8b1d-4e3f-9a5b-7c9d1e3f5a7b"
EXPORT_SIZE = 64 * 1024 * 1024
PATTERN = b"zerofs-csi kube backend e2e " * 2048  # 57344 bytes
OFFSET = 3 * 1024 * 1024


class StandinRuntime:
    """Runs the pod's container as the ZeroFS stand-in process on this host."""

    def __init__(self) -> None:
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, pod: dict[str, Any], mounted: MountedPod) -> None:
        config = mounted.config()
        config["cache"]["dir"] = str(mounted.directory / "cache")
        path = mounted.directory / "runtime-config.toml"
        path.write_text(tomli_w.dumps(config))
        environment = {"PATH": os.environ["PATH"], **mounted.env}
        # The container's own command (ZeroFS under the fence guard), the stand-in in
        # the place of the image's zerofs.
        (container,) = pod["spec"]["containers"]
        command = list(container["command"])
        assert command[-1] == "zerofs", command
        command[-1:] = [sys.executable, str(STANDIN)]
        self._processes[pod["metadata"]["uid"]] = subprocess.Popen(
            [*command, "run", "-c", str(path)], env=environment
        )

    def ready(self, pod: dict[str, Any]) -> bool:
        process = self._processes[pod["metadata"]["uid"]]
        assert process.poll() is None, f"the ZeroFS stand-in exited with {process.returncode}"
        probe = pod["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

    def stop(self, pod: dict[str, Any]) -> None:
        process = self._processes.pop(pod["metadata"]["uid"], None)
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(*argv: str) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, (
        f"{' '.join(argv)} failed with status {completed.returncode}: "
        f"{completed.stderr.strip() or completed.stdout.strip()}"
    )
    return completed.stdout


def free_nbd_device() -> Path:
    candidates = sorted(
        Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name.removeprefix("nbd"))
    )
    for sys_block in candidates:
        if not (sys_block / "pid").exists():
            return sys_block
    raise AssertionError(f"all {len(candidates)} nbd devices are connected")


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Short: the socket paths under it are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="zk-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with fake_cluster() as fake:
        yield fake


def test_volume_server_pod_serves_an_nbd_export(cluster: Cluster, scratch: Path) -> None:
    admin = cluster.api_client()
    cluster.create_daemonset(admin)
    runtime = StandinRuntime()
    kubelet = KubeletStandIn(
        api=admin,
        namespace=cluster.namespace,
        node=NODE,
        runtime=runtime,
        workdir=scratch / "kubelet",
    ).start()
    registry = CollectorRegistry()
    backend = KubernetesBackend(
        cluster.api_client(),
        namespace=cluster.namespace,
        node_name=NODE,
        socket_root=scratch / "sockets",
        owner=resolve_daemonset_owner(admin, cluster.namespace, daemonset_name=DAEMONSET),
        metrics=Metrics(NODE, registry),
        removal_timeout=60.0,
    )
    store = scratch / "objects"
    settings = parse_volume_settings(
        {"storageUrl": f"file://{store}", "podReadyTimeoutSeconds": "120"}
    )
    secrets = VolumeSecrets(encryption_password="e2e-password-never-logged")
    sys_block = free_nbd_device()
    device = f"/dev/{sys_block.name}"
    try:
        started = time.monotonic()
        sockets = backend.ensure(VOLUME, settings, secrets)
        ready_seconds = time.monotonic() - started
        pod = call_json(
            client.CoreV1Api(admin).read_namespaced_pod,
            objects.pod_name(VOLUME),
            cluster.namespace,
        )
        assert pod_is_ready(pod)
        assert [entry[2] for entry in kubelet.journal] == ["started", "ready"]

        # Calling again finds the ready pod: no second server.
        assert backend.ensure(VOLUME, settings, secrets) == sockets
        assert [entry[2] for entry in kubelet.journal] == ["started", "ready"]

        size = prepare_export(sockets.ninep, "disk", EXPORT_SIZE).size_bytes
        assert size == EXPORT_SIZE
        run("nbd-client", "-unix", str(sockets.nbd), "-N", "disk", device)
        assert int((sys_block / "size").read_text()) * 512 == EXPORT_SIZE
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, PATTERN, OFFSET)
            os.fsync(fd)  # an NBD FLUSH
        finally:
            os.close(fd)
        run("nbd-client", "-d", device)

        backing = store / VOLUME / ".nbd" / "disk"
        with backing.open("rb") as stored:
            stored.seek(OFFSET)
            assert stored.read(len(PATTERN)) == PATTERN
        print(f"\n    volume server pod ready in {ready_seconds:.2f} s; NBD export verified")

        backend.stop(VOLUME)
        assert [entry[2] for entry in kubelet.journal] == ["started", "ready", "deleted"]
        assert backend.running() == []
        assert not sockets.directory.exists()
        assert registry.get_sample_value(
            "zerofs_csi_server_removals_total", {"node": NODE, "outcome": "graceful"}
        )
        assert kubelet.errors == []
    finally:
        if (sys_block / "pid").exists():
            subprocess.run(["nbd-client", "-d", device], capture_output=True, check=False)
        kubelet.stop()


# ---------------------------------------------------------------- the plugin


class KubePlugin:
    """``python -m zerofs_csi --backend kubernetes``, as the node DaemonSet runs it."""

    def __init__(self, workdir: Path, cluster: Cluster, pod_name: str) -> None:
        self.workdir = workdir
        self.socket = workdir / "csi.sock"
        self.log = workdir / "plugin.log"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "test", "cluster": {"server": cluster.url}}],
                    "users": [{"name": "node", "user": {}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "node"}}],
                    "current-context": "test",
                }
            )
        )
        self.argv = [
            sys.executable, "-m", "zerofs_csi",
            "--role", "all", "--backend", "kubernetes",
            "--kubeconfig", str(kubeconfig),
            "--namespace", cluster.namespace,
            "--state-dir", str(workdir / "state"),
            "--endpoint", f"unix://{self.socket}",
            "--node-id", NODE,
            "--metrics-address", "",
            "--log-format", "text", "--log-level", "debug",
        ]  # fmt: skip
        self.environment = {**os.environ, "POD_NAME": pod_name}
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.environment
            )
        deadline = time.monotonic() + 120
        while not self.socket.is_socket():
            assert self.process.poll() is None, f"the plugin exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the plugin did not listen:\n{self.log_tail()}"
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        identity = csi_pb2_grpc.IdentityStub(self.channel)
        while not identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value:
            assert time.monotonic() < deadline, f"the plugin is not ready:\n{self.log_tail()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)


def test_node_stage_attaches_through_the_kubernetes_backend(
    cluster: Cluster, scratch: Path
) -> None:
    admin = cluster.api_client()
    daemonset = cluster.create_daemonset(admin)
    plugin_pod = {
        "metadata": {
            "name": "zerofs-csi-node-e2e",
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": DAEMONSET,
                    "uid": daemonset["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        # Not bound to a node: the kubelet stand-in runs only the volume servers.
        "spec": {"containers": [{"name": "plugin", "image": "zerofs-csi:e2e"}]},
    }
    core = client.CoreV1Api(admin)
    call_json(core.create_namespaced_pod, cluster.namespace, plugin_pod)
    kubelet = KubeletStandIn(
        api=admin,
        namespace=cluster.namespace,
        node=NODE,
        runtime=StandinRuntime(),
        workdir=scratch / "kubelet",
    ).start()
    plugin = KubePlugin(scratch, cluster, "zerofs-csi-node-e2e")
    secrets = {"ZEROFS_ENCRYPTION_PASSWORD": "e2e-plugin-password-never-logged"}
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    staging = scratch / "staging"
    target = scratch / "target"
    staging.mkdir()
    volume_id = ""
    try:
        plugin.start()
        created = plugin.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"pvc-{uuid.uuid4()}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=EXPORT_SIZE),
                volume_capabilities=[capability],
                parameters={
                    "storageUrl": f"file://{scratch / 'objects'}",
                    "filesystem": "ext4",
                    "podReadyTimeoutSeconds": "120",
                },
                secrets=secrets,
            ),
            timeout=300,
        )
        volume_id = created.volume.volume_id
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(staging),
            volume_capability=capability,
            volume_context=dict(created.volume.volume_context),
            secrets=secrets,
        )
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=capability,
            volume_context=dict(created.volume.volume_context),
        )
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        unstage = csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)
        )
        pod_name = objects.pod_name(volume_id)

        plugin.node.NodeStageVolume(stage, timeout=300)
        pod = call_json(core.read_namespaced_pod, pod_name, cluster.namespace)
        assert pod_is_ready(pod) and pod["spec"]["nodeName"] == NODE
        assert pod["metadata"]["ownerReferences"][0]["uid"] == daemonset["metadata"]["uid"]
        plugin.node.NodePublishVolume(publish, timeout=300)
        (target / "kept").write_bytes(PATTERN)
        plugin.node.NodeUnpublishVolume(unpublish, timeout=300)
        plugin.node.NodeUnstageVolume(unstage, timeout=300)
        listed = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
        assert pod_name not in [p["metadata"]["name"] for p in listed]
        assert [e[2] for e in kubelet.journal] == ["started", "ready", "deleted"]

        # Staged again: a new server pod, and the filesystem kept the file.
        plugin.node.NodeStageVolume(stage, timeout=300)
        again = call_json(core.read_namespaced_pod, pod_name, cluster.namespace)
        assert again["metadata"]["uid"] != pod["metadata"]["uid"]
        plugin.node.NodePublishVolume(publish, timeout=300)
        assert (target / "kept").read_bytes() == PATTERN
        plugin.node.NodeUnpublishVolume(unpublish, timeout=300)
        plugin.node.NodeUnstageVolume(unstage, timeout=300)
        plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets), timeout=300
        )
        assert kubelet.errors == []
        log = plugin.log.read_text(errors="replace")
        assert secrets["ZEROFS_ENCRYPTION_PASSWORD"] not in log
    except (AssertionError, grpc.RpcError):
        print(f"plugin log:\n{plugin.log_tail(80)}")
        raise
    finally:
        if volume_id:
            with contextlib.suppress(grpc.RpcError):
                plugin.node.NodeUnpublishVolume(unpublish, timeout=120)
            with contextlib.suppress(grpc.RpcError):
                plugin.node.NodeUnstageVolume(unstage, timeout=120)
        plugin.stop()
        kubelet.stop()
