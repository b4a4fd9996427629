"""Checkpoints on the Kubernetes backend: the controller's KubeCheckpoints writes a
CheckpointRequest, the node plugin's worker carries it out through the admin socket of
the volume's server (the real ZeroFS stand-in, as the server pod would run it), and the
outcome comes back through the request's status. Against the fake and (with envtest) a
real API server with the chart's CRD installed, where the worker runs as the node
plugin's user bound to a Role of ``kube.rbac.NODE_PLUGIN_RULES``.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry
from standin.servers import NbdClient, start_volume_server, stop_process

from kube.cluster import DAEMONSET, NODE, NODE_PLUGIN_USER, OTHER_NODE, Cluster
from kube.conftest import BACKEND_USER_AGENT, new_volume_id
from kube.test_rbac import WORKER_CALLS, _node_plugin_client
from zerofs_csi import DRIVER_NAME, errors
from zerofs_csi.config import Backend, Config, Endpoint, LogFormat, Role
from zerofs_csi.controller.checkpoints_kube import KubeCheckpoints
from zerofs_csi.controller.store import VolumeRecord
from zerofs_csi.controller.store_kube import KubernetesVolumeStore
from zerofs_csi.kube import checkpoint_requests as requests
from zerofs_csi.kube.api import call_json
from zerofs_csi.node.checkpoint_requests import CheckpointRequestWorker
from zerofs_csi.node.stage_record import RecordStore, StageRecord
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.runtime import build_node
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.volume.secrets import VolumeSecrets

CRD = Path(__file__).parents[2] / "charts" / "zerofs-csi" / "crds" / "checkpointrequests.yaml"
MiB = 1 << 20
SIZE = 16 * MiB
SECRETS = VolumeSecrets(encryption_password="pw-checkpoint-requests-test")

_installed: set[str] = set()
_install_lock = threading.Lock()


def install_crd(cluster: Cluster, admin: client.ApiClient) -> None:
    """The chart's CRD on a real server (once per server), established before use."""
    if cluster.kind != "real":
        return
    with _install_lock:
        if cluster.url in _installed:
            return
        extensions = client.ApiextensionsV1Api(admin)
        manifest = yaml.safe_load(CRD.read_text())
        call_json(extensions.create_custom_resource_definition, manifest)
        for _ in range(100):
            crd = call_json(
                extensions.read_custom_resource_definition, manifest["metadata"]["name"]
            )
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            threading.Event().wait(0.1)
        else:
            raise RuntimeError("the CheckpointRequest CRD was not established in 10s")
        _installed.add(cluster.url)


@dataclass
class Node:
    """What the node plugin of NODE has: stage records, locks, its volumes' servers."""

    records: RecordStore
    locks: VolumeLocks
    socket_root: Path
    store: Path  # the file:// storage of the volumes
    servers: list[subprocess.Popen[bytes]]

    def worker(self, api: client.ApiClient, namespace: str) -> CheckpointRequestWorker:
        """This node's checkpoint request worker, as its plugin builds it, not started."""
        return CheckpointRequestWorker(
            api,
            namespace=namespace,
            node_name=NODE,
            socket_root=self.socket_root,
            locks=self.locks,
            is_staged=self.records.is_staged,
            mounted_filesystem=self.records.mounted_filesystem,
        )

    def stage(self, volume_id: str) -> None:
        staging = self.records.index_dir.parent / "staging" / volume_id
        staging.mkdir(parents=True)
        sockets = ServerSockets.under(self.socket_root, volume_id)
        self.records.write(
            StageRecord(
                volume_id=volume_id,
                backend_id=volume_id,
                device_index=0,
                size_bytes=SIZE,
                access_type="block",
                fs_type="",
                server_backend="kubernetes",
                nbd_socket=str(sockets.nbd),
                staging_path=str(staging),
            )
        )

    def serve(self, volume_id: str) -> ServerSockets:
        """The volume's server as its pod runs it: its sockets in the host directory."""
        sockets = ServerSockets.under(self.socket_root, volume_id)
        self.servers.append(
            start_volume_server(sockets, self.store, volume_id, SECRETS, SIZE, self.store.parent)
        )
        return sockets


@dataclass
class Setup:
    cluster: Cluster
    admin: client.ApiClient
    node: Node
    volumes: KubernetesVolumeStore
    checkpoints: KubeCheckpoints

    def volume(self, published_node: str | None) -> str:
        volume_id = new_volume_id()
        self.volumes.create(
            VolumeRecord(
                volume_id=volume_id,
                capacity_bytes=SIZE,
                parameters={"storageUrl": f"file://{self.node.store}"},
                request_parameters={},
                volume_context={},
                published_node=published_node,
            )
        )
        return volume_id

    def requests(self) -> list[dict[str, Any]]:
        listed = call_json(
            client.CustomObjectsApi(self.admin).list_namespaced_custom_object,
            requests.GROUP,
            requests.VERSION,
            self.cluster.namespace,
            requests.PLURAL,
        )
        return list(listed.get("items") or [])


@pytest.fixture
def setup(cluster: Cluster, admin: client.ApiClient, socket_root: Path) -> Iterator[Setup]:
    install_crd(cluster, admin)
    with tempfile.TemporaryDirectory(prefix="zc-") as directory:
        store = Path(directory) / "store"
        store.mkdir()
        node = Node(RecordStore(Path(directory) / "node"), VolumeLocks(), socket_root, store, [])
        worker = node.worker(_node_plugin_client(cluster, admin), cluster.namespace).start()
        volumes = KubernetesVolumeStore(admin, cluster.namespace)
        checkpoints = KubeCheckpoints(admin, cluster.namespace, volumes, wait_seconds=15.0)
        try:
            yield Setup(cluster, admin, node, volumes, checkpoints)
        finally:
            worker.stop()
            for server in node.servers:
                stop_process(server)


def test_the_worker_stops_at_once_at_any_point_of_its_start(
    cluster: Cluster, admin: client.ApiClient, socket_root: Path
) -> None:
    # The node plugin's shutdown waits for it: stopped while listing, or before its watch
    # has sent its request, it must not wait for the watch's server-side timeout.
    install_crd(cluster, admin)
    with tempfile.TemporaryDirectory(prefix="zc-") as directory:
        node = Node(
            RecordStore(Path(directory) / "node"), VolumeLocks(), socket_root, Path(directory), []
        )
        node_plugin = _node_plugin_client(cluster, admin)
        for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 1.0):
            worker = node.worker(node_plugin, cluster.namespace).start()
            time.sleep(delay)
            began = time.monotonic()
            worker.stop()
            assert time.monotonic() - began < 3.0, f"stopped {delay} s after its start"


def test_a_staged_volume_is_checkpointed_by_its_nodes_plugin(setup: Setup) -> None:
    vid = setup.volume(published_node=NODE)
    setup.node.stage(vid)
    sockets = setup.node.serve(vid)
    with NbdClient(sockets.nbd, vid) as nbd:
        nbd.write(0, b"as-of-snapshot" * 64)

    made = setup.checkpoints.create(vid, {}, True, "snap-1", {})

    with NbdClient(sockets.nbd, vid) as nbd:
        nbd.write(0, b"after-snapshot" * 64)
    with AdminClient(sockets.admin, "stand-in") as server:
        found = server.find("snap-1")
    assert found is not None and found.id == made.id and found.created_at == made.created_at
    checkpoint_export = setup.node.store / vid / ".checkpoints" / made.id / ".nbd" / vid
    assert checkpoint_export.read_bytes()[: 14 * 64] == b"as-of-snapshot" * 64
    # Done requests are deleted; a retried call asks anew and finds the same checkpoint.
    assert setup.requests() == []
    assert setup.checkpoints.create(vid, {}, True, "snap-1", {}) == made

    setup.checkpoints.delete(vid, {}, True, "snap-1", {})
    with AdminClient(sockets.admin, "stand-in") as server:
        assert server.find("snap-1") is None
    setup.checkpoints.delete(vid, {}, True, "snap-1", {})  # idempotent
    assert setup.requests() == []
    if setup.cluster.fake is not None:
        # What the worker asked of the API is what the node plugin's rules grant for it.
        served = {
            (call.verb, call.api_group, call.resource)
            for call in setup.cluster.fake.calls
            if call.user_agent == BACKEND_USER_AGENT
        }
        assert served == WORKER_CALLS


def test_a_request_naming_no_valid_volume_fails_before_any_path_is_read(setup: Setup) -> None:
    # A stage record's index where a path escaping the index directory would lead.
    (setup.node.records.index_dir.parent / "escape.json").parent.mkdir(parents=True, exist_ok=True)
    (setup.node.records.index_dir.parent / "escape.json").write_text("{}")
    custom = client.CustomObjectsApi(setup.admin)
    scope = (requests.GROUP, requests.VERSION, setup.cluster.namespace, requests.PLURAL)
    forged = requests.CheckpointRequest("create-escape", requests.CREATE, "../escape", "s", NODE)
    call_json(custom.create_namespaced_custom_object, *scope, forged.manifest())
    for _ in range(100):
        status = call_json(custom.get_namespaced_custom_object, *scope, forged.name).get("status")
        if status:
            break
        threading.Event().wait(0.1)
    assert status is not None and status["phase"] == requests.FAILED
    assert status["code"] == "INVALID_ARGUMENT"


def test_the_node_plugin_may_not_create_or_delete_requests(setup: Setup) -> None:
    if setup.cluster.kind != "real":
        pytest.skip("authorization needs the real API server")
    plugin = client.CustomObjectsApi(
        setup.cluster.api_client(setup.cluster.user_tokens[NODE_PLUGIN_USER])
    )
    request = requests.CheckpointRequest(
        "create-forged", requests.CREATE, new_volume_id(), "snap-1", NODE
    )
    scope = (requests.GROUP, requests.VERSION, setup.cluster.namespace, requests.PLURAL)
    with pytest.raises(client.ApiException) as refused:
        call_json(plugin.create_namespaced_custom_object, *scope, request.manifest())
    assert refused.value.status == 403
    call_json(
        client.CustomObjectsApi(setup.admin).create_namespaced_custom_object,
        *scope,
        request.manifest(),
    )
    with pytest.raises(client.ApiException) as refused:
        call_json(plugin.delete_namespaced_custom_object, *scope, request.name)
    assert refused.value.status == 403


def test_a_request_left_for_the_volumes_former_node_is_replaced(setup: Setup) -> None:
    vid = setup.volume(published_node=OTHER_NODE)
    impatient = KubeCheckpoints(
        setup.admin, setup.cluster.namespace, setup.volumes, wait_seconds=0.5
    )
    with pytest.raises(errors.Unavailable, match=f"node plugin on node {OTHER_NODE}"):
        impatient.create(vid, {}, True, "snap-1", {})
    assert [r["spec"]["node"] for r in setup.requests()] == [OTHER_NODE]
    # The volume moved here: the retry asks this node, whose plugin takes the checkpoint.
    record = setup.volumes.get(vid)
    assert record is not None
    setup.volumes.update(record.replace(published_node=NODE))
    setup.node.stage(vid)
    sockets = setup.node.serve(vid)

    made = setup.checkpoints.create(vid, {}, True, "snap-1", {})

    with AdminClient(sockets.admin, "stand-in") as server:
        assert [c.id for c in server.list()] == [made.id]
    assert setup.requests() == []


def test_delete_drops_an_uncollected_create_request_of_the_checkpoint(setup: Setup) -> None:
    vid = setup.volume(published_node=NODE)
    setup.node.stage(vid)
    sockets = setup.node.serve(vid)
    made = setup.checkpoints.create(vid, {}, True, "snap-1", {})
    # The same outcome, written again and never collected (a caller that gave up).
    custom = client.CustomObjectsApi(setup.admin)
    scope = (requests.GROUP, requests.VERSION, setup.cluster.namespace, requests.PLURAL)
    name = requests.request_name(requests.CREATE, vid, "snap-1")
    left = requests.CheckpointRequest(name, requests.CREATE, vid, "snap-1", "node-gone")
    created = call_json(custom.create_namespaced_custom_object, *scope, left.manifest())
    created["status"] = requests.succeeded(made.id, int(made.created_at.timestamp()))
    call_json(custom.replace_namespaced_custom_object_status, *scope, name, created)

    setup.checkpoints.delete(vid, {}, True, "snap-1", {})

    assert setup.requests() == []
    again = setup.checkpoints.create(vid, {}, True, "snap-1", {})
    with AdminClient(sockets.admin, "stand-in") as server:
        assert [c.id for c in server.list()] == [again.id] != [made.id]


@dataclass(frozen=True)
class Refusal:
    published_node: str | None  # the node the controller asks
    staged: bool  # staged on NODE, whose plugin runs
    serving: bool  # its server answers on NODE
    busy: bool  # another node call holds the volume
    code: grpc.StatusCode
    says: str
    request_left: bool = False  # the request stays, waiting for its node


REFUSALS = {
    "staged nowhere": Refusal(
        None, False, False, False, grpc.StatusCode.FAILED_PRECONDITION, "staged on no node"
    ),
    "not staged on its node": Refusal(
        NODE,
        False,
        True,
        False,
        grpc.StatusCode.FAILED_PRECONDITION,
        f"is not staged on node {NODE}",
    ),
    "server not answering": Refusal(
        NODE, True, False, False, grpc.StatusCode.UNAVAILABLE, "does not answer"
    ),
    "volume busy on its node": Refusal(
        NODE, True, True, True, grpc.StatusCode.ABORTED, "is busy with stage"
    ),
    "node without a plugin": Refusal(
        OTHER_NODE,
        False,
        False,
        False,
        grpc.StatusCode.UNAVAILABLE,
        f"waits for the node plugin on node {OTHER_NODE}",
        request_left=True,
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=list(REFUSALS))
@pytest.mark.parametrize("operation", ["create", "delete"])
def test_refusals_carry_their_code_and_leave_no_checkpoint(
    setup: Setup, case: Refusal, operation: str
) -> None:
    vid = setup.volume(published_node=case.published_node)
    if case.staged:
        setup.node.stage(vid)
    sockets = setup.node.serve(vid) if case.serving else None
    if operation == "delete" and sockets is not None:
        with AdminClient(sockets.admin, "stand-in") as server:
            server.create("snap-1")
    # Nothing answers for another node: a short wait before UNAVAILABLE.
    checkpoints = (
        KubeCheckpoints(setup.admin, setup.cluster.namespace, setup.volumes, wait_seconds=1.0)
        if case.request_left
        else setup.checkpoints
    )
    method = checkpoints.create if operation == "create" else checkpoints.delete

    def call() -> object:
        return method(vid, {}, True, "snap-1", {})

    with pytest.raises(errors.CsiError) as info:
        if case.busy:
            with setup.node.locks.hold(vid, "stage"):
                call()
        else:
            call()

    assert info.value.code is case.code, info.value.message
    assert case.says in info.value.message
    if sockets is not None:
        with AdminClient(sockets.admin, "stand-in") as server:
            names = [c.name for c in server.list()]
        assert names == ([] if operation == "create" else ["snap-1"])
    left = setup.requests()
    if case.request_left:
        # Another node's request: this node's plugin leaves it alone.
        assert [r["spec"]["node"] for r in left] == [OTHER_NODE]
        assert "phase" not in (left[0].get("status") or {})
    else:
        assert left == []


def _kubeconfig(cluster: Cluster, path: Path) -> Path:
    user: dict[str, str] = {}
    if cluster.kind == "real":
        user = {"token": cluster.user_tokens[NODE_PLUGIN_USER]}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": cluster.url, "insecure-skip-tls-verify": True},
                    }
                ],
                "users": [{"name": "node", "user": user}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "node"}}],
                "current-context": "test",
            }
        )
    )
    return path


def test_the_node_plugin_as_built_carries_out_its_nodes_requests(
    cluster: Cluster, admin: client.ApiClient, daemonset: dict[str, Any]
) -> None:
    install_crd(cluster, admin)
    _node_plugin_client(cluster, admin)  # its Role, on the real server
    with tempfile.TemporaryDirectory(prefix="zn-") as directory:
        root = Path(directory)
        config = Config(
            endpoint=Endpoint("unix", str(root / "csi.sock")),
            node_id=NODE,
            role=Role.NODE,
            driver_name=DRIVER_NAME,
            metrics_address="",
            log_level="info",
            log_format=LogFormat.TEXT,
            state_dir=root / "state",
            namespace=cluster.namespace,
            max_volumes_per_node=0,
            workers=2,
            shutdown_grace_seconds=1.0,
            backend=Backend.KUBERNETES,
            zerofs_command="zerofs",
            kubeconfig=str(_kubeconfig(cluster, root / "kubeconfig")),
            daemonset_name=DAEMONSET,
            server_removal_timeout_seconds=1.0,
        )
        (root / "store").mkdir()
        runtime = build_node(config, Metrics(NODE, CollectorRegistry()))
        node = Node(
            RecordStore(config.state_dir), VolumeLocks(), config.socket_root, root / "store", []
        )
        volumes = KubernetesVolumeStore(admin, cluster.namespace)
        setup = Setup(
            cluster, admin, node, volumes, KubeCheckpoints(admin, cluster.namespace, volumes)
        )
        try:
            vid = setup.volume(published_node=NODE)
            with pytest.raises(errors.FailedPrecondition, match=f"not staged on node {NODE}"):
                setup.checkpoints.create(vid, {}, True, "snap-1", {})
            node.stage(vid)
            sockets = node.serve(vid)
            made = setup.checkpoints.create(vid, {}, True, "snap-1", {})
            with AdminClient(sockets.admin, "stand-in") as server:
                assert [c.id for c in server.list()] == [made.id]
        finally:
            runtime.close()
            for server_process in node.servers:
                stop_process(server_process)
