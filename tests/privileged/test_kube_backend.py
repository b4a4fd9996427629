"""End to end through the Kubernetes backend: API objects, a kubelet, a server, NBD.

The backend creates the volume's config Secret and pod on the (fake) API server; a
kubelet stand-in on this node sees the pod, mounts its Secret (config.toml and the
secretKeyRef environment), starts the ZeroFS stand-in (tools/zerofs_standin.py: nbdkit
and diod) from that config, runs the pod's own readiness probe command against the
sockets and marks the pod Ready. The node side then creates the export over 9P and
attaches it through the kernel's NBD driver with nbd-client; the bytes written to the
device arrive in the volume's storage. Finally the backend stops the server.

The ZeroFS stand-in serves only ``file://`` storage. The volume is configured with
ZeroFS's ``memory://`` store, and the stand-in "container runtime" below maps it to a
scratch directory, as it maps the pod's cache emptyDir to a host directory.

Run in the VM with:

    python3 tests/vm/runner.py --timeout 900 -- \
        .venv/bin/pytest -m privileged tests/privileged/test_kube_backend.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from kube.cluster import DAEMONSET, NODE, Cluster, fake_cluster
from kube.kubelet import KubeletStandIn, MountedPod
from kubernetes import client
from prometheus_client import CollectorRegistry

from zerofs_csi.kube import objects
from zerofs_csi.kube.api import call_json
from zerofs_csi.kube.backend import KubernetesBackend, pod_is_ready
from zerofs_csi.kube.owner import resolve_daemonset_owner
from zerofs_csi.metrics import Metrics
from zerofs_csi.ninep import ensure_export
from zerofs_csi.volume_settings import VolumeSecrets, parse_volume_settings

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs_standin.py"
VOLUME = "pvc-0e2f4a6c-8b1d-4e3f-9a5b-7c9d1e3f5a7b"
EXPORT_SIZE = 64 * 1024 * 1024
PATTERN = b"zerofs-csi kube backend e2e " * 2048  # 57344 bytes
OFFSET = 3 * 1024 * 1024


class StandinRuntime:
    """Runs the pod's container as the ZeroFS stand-in process on this host."""

    def __init__(self, storage_root: Path) -> None:
        self.storage_root = storage_root
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def storage_of(self, url: str) -> Path:
        assert url.startswith("memory:///"), url
        return self.storage_root / url.removeprefix("memory:///")

    def start(self, pod: dict[str, Any], mounted: MountedPod) -> None:
        config = mounted.config()
        config["storage"]["url"] = f"file://{self.storage_of(config['storage']['url'])}"
        config["cache"]["dir"] = str(mounted.directory / "cache")
        path = mounted.directory / "runtime-config.toml"
        path.write_text(tomli_w.dumps(config))
        environment = {"PATH": os.environ["PATH"], **mounted.env}
        self._processes[pod["metadata"]["uid"]] = subprocess.Popen(
            [sys.executable, str(STANDIN), "run", "-c", str(path)], env=environment
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
    runtime = StandinRuntime(scratch / "objects")
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
        registry=registry,
        removal_timeout=60.0,
    )
    settings = parse_volume_settings({"storageUrl": "memory://", "podReadyTimeoutSeconds": "120"})
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

        size = ensure_export(sockets.ninep, "disk", EXPORT_SIZE)
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

        backing = runtime.storage_of(f"memory:///{VOLUME}") / ".nbd" / "disk"
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
