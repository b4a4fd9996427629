"""The Controller's snapshot RPCs on the Kubernetes backend, wired as
``runtime.build_controller`` wires them: volume and snapshot records as ConfigMaps,
checkpoints through CheckpointRequests carried out by the node plugin's worker on the
real ZeroFS stand-in. Against the fake and (with envtest) a real API server.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry
from standin.servers import NbdClient, stop_process

from kube.cluster import NODE, Cluster
from kube.test_checkpoint_requests import SIZE, Node, install_crd
from kube.test_events import events_about
from zerofs_csi import errors
from zerofs_csi.controller.checkpoints_kube import KubeCheckpoints
from zerofs_csi.controller.job_pods_kube import KubeJobs
from zerofs_csi.controller.nodes import LocalNodes
from zerofs_csi.controller.service import ControllerService
from zerofs_csi.controller.snapshot_store import SnapshotRecord
from zerofs_csi.controller.snapshot_store_kube import KubernetesSnapshotStore, config_map_name
from zerofs_csi.controller.store_kube import KubernetesVolumeStore
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.kube.api import call_json
from zerofs_csi.node.stage_record import RecordStore
from zerofs_csi.observability.events import KubernetesEventRecorder
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.rpc.interceptor import CsiInterceptor
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.pods import job_pods
from zerofs_csi.servers.pods.job_pods import ANNOTATION_LAST_STEP
from zerofs_csi.volume.context import PVC_NAME_KEY, PVC_NAMESPACE_KEY

Mode = csi_pb2.VolumeCapability.AccessMode
# The controller's default --job-idle-timeout.
IDLE = 900.0


def record(key: str, volume_id: str = "pvc-source") -> SnapshotRecord:
    return SnapshotRecord(
        key=key,
        name=f"name-of-{key}",
        snapshot_id=f"{volume_id}@{key}",
        source_volume_id=volume_id,
        checkpoint_id="0b7f6a1e-checkpoint",
        size_bytes=SIZE,
        created_at_seconds=1_700_000_000,
        parameters={"storageUrl": "s3://bucket/volumes"},
    )


def test_snapshot_records_live_in_config_maps(cluster: Cluster, admin: client.ApiClient) -> None:
    store = KubernetesSnapshotStore(admin, cluster.namespace)
    assert store.get("snap-a") is None and store.list() == []
    for key in ("snap-b", "snap-a"):
        store.create(record(key))
    assert store.get("snap-a") == record("snap-a")
    assert [r.key for r in store.list()] == ["snap-a", "snap-b"]
    with pytest.raises(errors.Aborted, match="created concurrently"):
        store.create(record("snap-a"))
    store.delete("snap-a")
    store.delete("snap-a")  # idempotent
    assert [r.key for r in store.list()] == ["snap-b"]
    with pytest.raises(errors.InvalidArgument):
        store.get("../escape")
    # A damaged record is INTERNAL, naming it.
    core = client.CoreV1Api(admin)
    stored = call_json(
        core.read_namespaced_config_map, config_map_name("snap-b"), cluster.namespace
    )
    stored["data"]["snapshot.json"] = json.dumps({"schema": 1, "key": "snap-b"})
    call_json(
        core.replace_namespaced_config_map, config_map_name("snap-b"), cluster.namespace, stored
    )
    with pytest.raises(errors.Internal, match="snap-b is damaged"):
        store.get("snap-b")


BLOCK = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


@dataclass
class Controller:
    stub: csi_pb2_grpc.ControllerStub
    node: Node
    checkpoints: KubeCheckpoints

    def volume_request(self, name: str, **fields: Any) -> csi_pb2.CreateVolumeRequest:
        """A block volume of SIZE on the node's file:// store."""
        return csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[BLOCK],
            parameters={"storageUrl": f"file://{self.node.store}"},
            **fields,
        )

    def create(self, name: str) -> str:
        return str(self.stub.CreateVolume(self.volume_request(name), timeout=30).volume.volume_id)

    def publish_request(self, volume_id: str) -> csi_pb2.ControllerPublishVolumeRequest:
        return csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=NODE, volume_capability=BLOCK
        )

    def served_source(self, name: str) -> tuple[str, ServerSockets]:
        """A volume published, staged and served on the node: its id, its server's
        sockets."""
        source = self.create(name)
        self.stub.ControllerPublishVolume(self.publish_request(source), timeout=30)
        self.node.stage(source)
        return source, self.node.serve(source)

    def clone_request(self, name: str, source: str) -> csi_pb2.CreateVolumeRequest:
        Source = csi_pb2.VolumeContentSource
        return self.volume_request(
            name,
            volume_content_source=Source(volume=Source.VolumeSource(volume_id=source)),
            secrets={"ZEROFS_ENCRYPTION_PASSWORD": f"pw-{name}"},
        )

    def offered(self) -> set[int]:
        reply = self.stub.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30
        )
        return {c.rpc.type for c in reply.capabilities}


@pytest.fixture
def controller(
    request: pytest.FixtureRequest, cluster: Cluster, admin: client.ApiClient, socket_root: Path
) -> Iterator[Controller]:
    """The controller; parametrized indirectly with a copy image, it restores."""
    copy_image = getattr(request, "param", "")
    install_crd(cluster, admin)
    with tempfile.TemporaryDirectory(prefix="zk-") as directory:
        root = Path(directory)
        (root / "store").mkdir()
        node = Node(RecordStore(root / "node"), VolumeLocks(), socket_root, root / "store", [])
        worker = node.worker(cluster.api_client(), cluster.namespace).start()
        volumes = KubernetesVolumeStore(admin, cluster.namespace)
        checkpoints = KubeCheckpoints(
            admin,
            cluster.namespace,
            volumes,
            jobs=KubeJobs(admin, cluster.namespace, copy_image, wait_seconds=0.5)
            if copy_image
            else None,
        )
        service = ControllerService(
            volumes,
            Metrics("", CollectorRegistry()),
            nodes=LocalNodes([NODE], max_volumes_per_node=0),
            snapshot_store=KubernetesSnapshotStore(admin, cluster.namespace),
            checkpoints=checkpoints,
            events=KubernetesEventRecorder(
                client.CoreV1Api(admin), "zerofs-csi-controller", "controller-a"
            ),
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[CsiInterceptor(REDACTOR)]
        )
        csi_pb2_grpc.add_ControllerServicer_to_server(service, server)
        server.add_insecure_port(f"unix://{root}/csi.sock")
        server.start()
        try:
            with grpc.insecure_channel(f"unix://{root}/csi.sock") as channel:
                yield Controller(csi_pb2_grpc.ControllerStub(channel), node, checkpoints)
        finally:
            server.stop(grace=None).wait()
            worker.stop()
            for process in node.servers:
                stop_process(process)


def test_a_staged_volume_is_snapshotted_through_its_nodes_plugin(controller: Controller) -> None:
    vid = controller.create("pvc-kube-snap")
    snapshot = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=vid)
    with pytest.raises(grpc.RpcError) as refused:
        controller.stub.CreateSnapshot(snapshot, timeout=60)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "must be in use by a pod" in str(refused.value.details())

    controller.stub.ControllerPublishVolume(controller.publish_request(vid), timeout=30)
    controller.node.stage(vid)
    sockets = controller.node.serve(vid)
    with NbdClient(sockets.nbd, vid) as nbd:
        nbd.write(0, b"as-of-snapshot" * 64)

    made = controller.stub.CreateSnapshot(snapshot, timeout=60).snapshot

    assert made.ready_to_use and made.size_bytes == SIZE and made.source_volume_id == vid
    assert controller.stub.CreateSnapshot(snapshot, timeout=60).snapshot == made
    listed = controller.stub.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30)
    assert [e.snapshot.snapshot_id for e in listed.entries] == [made.snapshot_id]
    with AdminClient(sockets.admin, "stand-in") as server:
        (checkpoint,) = server.list()
    export = controller.node.store / vid / ".checkpoints" / checkpoint.id / ".nbd" / vid
    assert export.read_bytes()[: 14 * 64] == b"as-of-snapshot" * 64

    controller.stub.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=made.snapshot_id), timeout=60
    )
    with AdminClient(sockets.admin, "stand-in") as server:
        assert server.list() == []
    assert not controller.stub.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30).entries


def test_no_volume_is_created_from_a_snapshot_or_a_volume(controller: Controller) -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC
    offered = controller.offered()
    assert rpc.CREATE_DELETE_SNAPSHOT in offered and rpc.CLONE_VOLUME not in offered
    source = controller.create("pvc-kube-source")
    controller.stub.ControllerPublishVolume(controller.publish_request(source), timeout=30)
    controller.node.stage(source)
    sockets = controller.node.serve(source)
    Source = csi_pb2.VolumeContentSource
    for content in (
        Source(volume=Source.VolumeSource(volume_id=source)),
        Source(snapshot=Source.SnapshotSource(snapshot_id=f"{source}@snap-1")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            controller.stub.CreateVolume(
                controller.volume_request("pvc-kube-copy", volume_content_source=content),
                timeout=60,
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert "creates no volume from a snapshot or a volume" in str(refused.value.details())
    # Nothing was taken of the source for it.
    with AdminClient(sockets.admin, "stand-in") as server:
        assert server.list() == []
    listed = controller.stub.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
    assert [e.volume.volume_id for e in listed.entries] == [source]


@pytest.mark.parametrize("controller", ["zerofs-csi:clone-test"], indirect=True)
def test_a_clone_keeps_its_checkpoint_until_its_restore_pod_succeeds(
    controller: Controller, cluster: Cluster, admin: client.ApiClient
) -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC
    offered = controller.offered()
    assert rpc.CLONE_VOLUME in offered
    source, sockets = controller.served_source("pvc-kube-source")
    clone = controller.clone_request("pvc-kube-clone", source)
    clone.capacity_range.required_bytes = 2 * SIZE
    # What the provisioner's --extra-create-metadata adds: the claim, told of the copy.
    clone.parameters[PVC_NAME_KEY] = "clone-claim"
    clone.parameters[PVC_NAMESPACE_KEY] = cluster.namespace
    core = client.CoreV1Api(admin)
    for _ in range(2):  # the retry follows the same restore
        with pytest.raises(grpc.RpcError) as in_progress:
            controller.stub.CreateVolume(clone, timeout=60)
        assert in_progress.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "runs in pod" in str(in_progress.value.details())
        (pod,) = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
        new_volume = pod["metadata"]["labels"]["zerofs.csi.driver/volume"]
        # The copy reads the checkpoint taken for it, which stays meanwhile.
        with AdminClient(sockets.admin, "stand-in") as server:
            assert [c.name for c in server.list()] == [f"clone:{new_volume}"]
    # One event for both retries (a minute's repeats are dropped), naming the pod.
    [told] = events_about(admin, cluster.namespace, "clone-claim")
    assert (told["type"], told["reason"]) == ("Normal", "RestoreInProgress")
    assert told["involvedObject"]["kind"] == "PersistentVolumeClaim"
    assert job_pods.restore_pod_name(new_volume) in told["message"]
    source_server = pod["spec"]["initContainers"][0]
    assert source_server["args"][-2:] == ["--checkpoint", f"clone:{new_volume}"]
    copy = pod["spec"]["containers"][0]["args"]
    assert copy[copy.index("--source-export") + 1] == source
    assert copy[copy.index("--capacity-bytes") + 1] == str(2 * SIZE)

    pod["status"] = {"phase": "Succeeded"}
    name = job_pods.restore_pod_name(new_volume)
    call_json(core.replace_namespaced_pod_status, name, cluster.namespace, pod)
    volume = controller.stub.CreateVolume(clone, timeout=60).volume

    assert volume.volume_id == new_volume and volume.content_source.volume.volume_id == source
    assert volume.capacity_bytes == 2 * SIZE
    told_end = [e for e in events_about(admin, cluster.namespace, "clone-claim") if e != told]
    assert [(e["type"], e["reason"]) for e in told_end] == [("Normal", "Restored")]
    assert told_end[0]["message"] == f"volume {new_volume} holds the data of volume {source}"
    with AdminClient(sockets.admin, "stand-in") as server:
        assert server.list() == []
    assert call_json(core.list_namespaced_pod, cluster.namespace)["items"] == []


@pytest.mark.parametrize("controller", ["zerofs-csi:clone-test"], indirect=True)
def test_a_clone_given_up_goes_with_its_checkpoint(
    controller: Controller, cluster: Cluster, admin: client.ApiClient
) -> None:
    """A claim deleted while its clone is copied is never asked for again: once no call
    has stepped its restore pod for the idle timeout, the sweep deletes the checkpoint
    taken for it through the source's node, then the pod and its Secret."""
    source, sockets = controller.served_source("pvc-kube-source")
    clone = controller.clone_request("pvc-kube-given-up", source)
    core = client.CoreV1Api(admin)

    def step() -> str:
        with pytest.raises(grpc.RpcError) as in_progress:
            controller.stub.CreateVolume(clone, timeout=60)
        assert in_progress.value.code() is grpc.StatusCode.UNAVAILABLE
        (pod,) = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
        return str(pod["metadata"]["name"])

    def age(name: str) -> None:
        pod = call_json(core.read_namespaced_pod, name, cluster.namespace)
        pod["metadata"]["annotations"][ANNOTATION_LAST_STEP] = str(int(time.time()) - 3600)
        call_json(core.replace_namespaced_pod, name, cluster.namespace, pod)

    def checkpoints() -> list[str]:
        with AdminClient(sockets.admin, "stand-in") as server:
            return [c.name for c in server.list()]

    name = step()
    assert controller.checkpoints.sweep_idle_jobs(IDLE) == []
    # A retry after a long pause marks the pod stepped again: it is not swept.
    age(name)
    step()
    assert controller.checkpoints.sweep_idle_jobs(IDLE) == []
    assert checkpoints() == [f"clone:{name.removeprefix(job_pods.RESTORE_PREFIX)}"]

    age(name)
    deadline = time.monotonic() + 60
    while (removed := controller.checkpoints.sweep_idle_jobs(IDLE)) == []:
        # The checkpoint's delete goes through the node plugin first; the pod waits.
        assert call_json(core.read_namespaced_pod, name, cluster.namespace)
        assert time.monotonic() < deadline, "the sweep never removed the pod"
        time.sleep(0.5)

    assert removed == [name]
    assert checkpoints() == []
    assert call_json(core.list_namespaced_pod, cluster.namespace)["items"] == []
    secrets = call_json(core.list_namespaced_secret, cluster.namespace)["items"]
    assert name not in [secret["metadata"]["name"] for secret in secrets]


@pytest.mark.parametrize("controller", ["zerofs-csi:checkpoint-test"], indirect=True)
def test_a_volume_staged_nowhere_is_checkpointed_by_a_checkpoint_pod(
    controller: Controller, cluster: Cluster, admin: client.ApiClient
) -> None:
    secrets = {"ZEROFS_ENCRYPTION_PASSWORD": "pw-checkpoint-pod"}
    vid = controller.create("pvc-kube-nowhere")
    snapshot = csi_pb2.CreateSnapshotRequest(
        name="snap-nowhere", source_volume_id=vid, secrets=secrets
    )
    with pytest.raises(grpc.RpcError) as in_progress:
        controller.stub.CreateSnapshot(snapshot, timeout=60)
    assert in_progress.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "runs in pod" in str(in_progress.value.details())
    core = client.CoreV1Api(admin)
    name = job_pods.checkpoint_pod_name(vid)
    pod = call_json(core.read_namespaced_pod, name, cluster.namespace)
    job = pod["spec"]["containers"][0]["args"]
    assert job[job.index("--create") + 1] == "snap-nowhere"
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["server"]
    # No second writer meanwhile: the volume is not published while the pod runs.
    publish = controller.publish_request(vid)
    with pytest.raises(grpc.RpcError) as busy:
        controller.stub.ControllerPublishVolume(publish, timeout=30)
    assert busy.value.code() is grpc.StatusCode.UNAVAILABLE
    assert f"runs in job pod {cluster.namespace}/{name}" in str(busy.value.details())

    # kubelet's report of the job's end, as checkpoint_job writes it.
    reported = {"id": "5c0e5a3a-checkpoint", "name": "snap-nowhere", "createdAt": 1_700_000_123}
    pod["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": job_pods.JOB_CONTAINER,
                "image": "zerofs-csi:checkpoint-test",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "message": json.dumps(reported),
                    }
                },
            }
        ],
    }
    call_json(core.replace_namespaced_pod_status, name, cluster.namespace, pod)
    made = controller.stub.CreateSnapshot(snapshot, timeout=60).snapshot
    assert made.ready_to_use and made.source_volume_id == vid
    assert made.creation_time.seconds == 1_700_000_123
    assert call_json(core.list_namespaced_pod, cluster.namespace)["items"] == []
    controller.stub.ControllerPublishVolume(publish, timeout=30)


def _end(core: client.CoreV1Api, namespace: str, name: str, message: str = "") -> None:
    """kubelet's report of a job pod that succeeded."""
    pod = call_json(core.read_namespaced_pod, name, namespace)
    terminated = {"exitCode": 0, "reason": "Completed", "message": message}
    pod["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": job_pods.JOB_CONTAINER,
                "image": pod["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    call_json(core.replace_namespaced_pod_status, name, namespace, pod)


def _in_progress(call: Any, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as waiting:
        call()
    assert waiting.value.code() is grpc.StatusCode.UNAVAILABLE, waiting.value.details()
    assert needle in str(waiting.value.details()), waiting.value.details()


@pytest.mark.parametrize("controller", ["zerofs-csi:clone-test"], indirect=True)
def test_a_clone_of_a_source_staged_nowhere_copies_the_source_itself(
    controller: Controller, cluster: Cluster, admin: client.ApiClient
) -> None:
    """No checkpoint: the restore pod runs the source's own server, the only one while
    it runs (no publish, no checkpoint pod of the source meanwhile)."""
    source = controller.create("pvc-kube-idle-source")
    clone = controller.clone_request("pvc-kube-idle-clone", source)
    core = client.CoreV1Api(admin)
    create = lambda: controller.stub.CreateVolume(clone, timeout=60)  # noqa: E731
    _in_progress(create, "runs in pod")
    (pod,) = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
    name = pod["metadata"]["name"]
    assert pod["metadata"]["labels"][job_pods.LABEL_SERVES_VOLUME] == source
    assert job_pods.checkpoint_read(pod) is None
    source_server, _ = pod["spec"]["initContainers"]
    assert "--checkpoint" not in source_server["args"] and source_server["args"][0] == "run"
    copy = pod["spec"]["containers"][0]["args"]
    assert copy[copy.index("--source-export") + 1] == source

    publish = controller.publish_request(source)
    _in_progress(
        lambda: controller.stub.ControllerPublishVolume(publish, timeout=30),
        f"runs in job pod {cluster.namespace}/{name}",
    )
    snapshot = csi_pb2.CreateSnapshotRequest(
        name="snap-idle", source_volume_id=source, secrets=dict(clone.secrets)
    )
    _in_progress(
        lambda: controller.stub.CreateSnapshot(snapshot, timeout=60),
        f"job pod {cluster.namespace}/{name} runs a server of volume {source}",
    )
    assert [
        p["metadata"]["name"]
        for p in call_json(core.list_namespaced_pod, cluster.namespace)["items"]
    ] == [name]

    _end(core, cluster.namespace, name)
    volume = create().volume
    assert volume.content_source.volume.volume_id == source
    assert call_json(core.list_namespaced_pod, cluster.namespace)["items"] == []
    controller.stub.ControllerPublishVolume(publish, timeout=30)


@pytest.mark.parametrize("controller", ["zerofs-csi:clone-test"], indirect=True)
def test_a_clone_whose_source_was_unstaged_meanwhile_drops_its_checkpoint_first(
    controller: Controller, cluster: Cluster, admin: client.ApiClient
) -> None:
    source, sockets = controller.served_source("pvc-kube-moving-source")
    clone = controller.clone_request("pvc-kube-moving-clone", source)
    core = client.CoreV1Api(admin)
    create = lambda: controller.stub.CreateVolume(clone, timeout=60)  # noqa: E731
    _in_progress(create, "runs in pod")
    (reader,) = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
    new_volume = reader["metadata"]["labels"]["zerofs.csi.driver/volume"]
    checkpoint = f"clone:{new_volume}"
    assert job_pods.checkpoint_read(reader) == (source, checkpoint)
    controller.stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=source, node_id=NODE), timeout=30
    )

    # Staged nowhere now: the checkpoint taken for the clone goes first, through a
    # checkpoint pod, while the restore pod that reads it stays as the mark of it.
    _in_progress(create, "runs in pod")
    deleting = job_pods.checkpoint_pod_name(source)
    pod = call_json(core.read_namespaced_pod, deleting, cluster.namespace)
    job = pod["spec"]["containers"][0]["args"]
    assert job[job.index("--delete") + 1] == checkpoint
    assert call_json(core.read_namespaced_pod, reader["metadata"]["name"], cluster.namespace)
    _in_progress(create, "runs in pod")  # a retry follows the same checkpoint pod

    _end(core, cluster.namespace, deleting, "{}")
    _in_progress(create, "runs in pod")
    (copier,) = call_json(core.list_namespaced_pod, cluster.namespace)["items"]
    assert copier["metadata"]["name"] == reader["metadata"]["name"]
    assert copier["metadata"]["uid"] != reader["metadata"]["uid"]
    assert copier["metadata"]["labels"][job_pods.LABEL_SERVES_VOLUME] == source
    assert job_pods.checkpoint_read(copier) is None

    _end(core, cluster.namespace, copier["metadata"]["name"])
    assert create().volume.volume_id == new_volume
    assert call_json(core.list_namespaced_pod, cluster.namespace)["items"] == []
