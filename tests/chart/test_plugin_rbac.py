"""The chart's plugin RBAC covers every API call the plugin makes, and grants nothing unused.

The controller is built the way the plugin builds it (server.build with --role
controller and --backend kubernetes, a kubeconfig pointing at the in-process API server
of tests/kube) and driven through its gRPC socket over a volume's whole life. The API
server records each request as RBAC sees it (verb, group, resource); the chart's
controller Role must grant all of them and nothing else. Whatever the controller is
wired to call in the future shows up here the same way.

The node plugin's namespaced calls are checked by tests/kube/test_rbac.py against
zerofs_csi.kube.rbac, which the chart's node Role equals (test_chart.py); its Events
on claims in other namespaces are checked here against the chart's node ClusterRole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from kube.cluster import Cluster, fake_cluster
from kube.fake_apiserver import KINDS
from kubernetes import client

from chart.conftest import CHART, Helm, Manifest, find
from zerofs_csi.config import Backend, Config, Endpoint, LogFormat, Role
from zerofs_csi.controller.snapshot_store import SnapshotRecord
from zerofs_csi.controller.snapshot_store_kube import KubernetesSnapshotStore
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.kube.api import call_json, make_api_client
from zerofs_csi.kube.controller_rbac import (
    CONTROLLER_PLUGIN_CLUSTER_RULES,
    CONTROLLER_PLUGIN_RULES,
)
from zerofs_csi.node.checkpoint_requests import CheckpointRequestWorker
from zerofs_csi.node.stage_record import RecordStore
from zerofs_csi.observability.events import PVC_NAME_KEY, PVC_NAMESPACE_KEY, KubernetesEventRecorder
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.server import build
from zerofs_csi.servers.pods import job_pods, objects

ADMIN_AGENT = "chart-test-admin"
DRIVER = "zerofs.csi.driver"
SECRETS = {"ZEROFS_ENCRYPTION_PASSWORD": "pw-chart-rbac-test"}
Call = tuple[str, str, str]


def _granted(role: Manifest) -> set[Call]:
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _served(cluster: Cluster, since: int) -> set[Call]:
    """The requests after the first ``since``, except the test's own."""
    assert cluster.fake is not None
    return {
        (call.verb, call.api_group, call.resource)
        for call in cluster.fake.calls[since:]
        if call.user_agent != ADMIN_AGENT
    }


def _namespaced(calls: set[Call], namespaced: bool = True) -> set[Call]:
    return {c for c in calls if KINDS[(c[1], c[2].split("/")[0])].namespaced is namespaced}


def _calls_so_far(cluster: Cluster) -> int:
    assert cluster.fake is not None
    return len(cluster.fake.calls)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with fake_cluster() as fake:
        yield fake


def _admin(cluster: Cluster) -> client.ApiClient:
    admin = cluster.api_client()
    admin.user_agent = ADMIN_AGENT
    return admin


def _kubeconfig(cluster: Cluster, directory: Path) -> Path:
    path = directory / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": cluster.url}}],
                "users": [{"name": "controller", "user": {}}],
                "contexts": [
                    {"name": "test", "context": {"cluster": "test", "user": "controller"}}
                ],
                "current-context": "test",
            }
        )
    )
    return path


@contextlib.contextmanager
def _controller(cluster: Cluster, tmp_path: Path) -> Iterator[csi_pb2_grpc.ControllerStub]:
    socket = tmp_path / "csi.sock"
    config = Config(
        endpoint=Endpoint("unix", str(socket)),
        node_id="",
        role=Role.CONTROLLER,
        driver_name=DRIVER,
        metrics_address="",
        log_level="info",
        log_format=LogFormat.TEXT,
        state_dir=tmp_path / "state",
        namespace=cluster.namespace,
        max_volumes_per_node=0,
        workers=4,
        shutdown_grace_seconds=1.0,
        backend=Backend.KUBERNETES,
        zerofs_command="zerofs",
        kubeconfig=str(_kubeconfig(cluster, tmp_path)),
        daemonset_name="",
        server_removal_timeout_seconds=1.0,
        job_image="zerofs-csi:rbac-test",
    )
    plugin = build(config, checks=[])
    plugin.server.start()
    channel = grpc.insecure_channel(config.endpoint.grpc_target)
    try:
        yield csi_pb2_grpc.ControllerStub(channel)
    finally:
        channel.close()
        plugin.server.stop(grace=None).wait()
        plugin.close()


def _mount_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )


def _volume_life(
    controller: csi_pb2_grpc.ControllerStub,
    name: str,
    leftover_server: tuple[client.ApiClient, str] | None = None,
    **parameters: str,
) -> None:
    capability = _mount_capability()
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
        volume_capabilities=[capability],
        parameters={
            "storageUrl": "s3://zerofs-chart-test/volumes",
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "team-a",
            **parameters,
        },
        secrets=SECRETS,
    )
    volume = controller.CreateVolume(request).volume
    assert controller.CreateVolume(request).volume.volume_id == volume.volume_id
    controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[capability]
        )
    )
    publish = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id,
        node_id="node-gone",
        volume_capability=capability,
        volume_context=volume.volume_context,
    )
    with pytest.raises(grpc.RpcError) as refused:
        controller.ControllerPublishVolume(publish)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    publish.node_id = "node-a"
    controller.ControllerPublishVolume(publish)
    # A snapshot asked of node-a's plugin, which has not staged the volume: refused
    # there, the refusal carried back and the request deleted.
    snapshot = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=volume.volume_id)
    with pytest.raises(grpc.RpcError) as refused:
        controller.CreateSnapshot(snapshot)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "not staged on node node-a" in str(refused.value.details())
    controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=10))
    assert [e.volume.volume_id for e in listed.entries] == [volume.volume_id]
    controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="node-a")
    )
    expanded = controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 30),
        )
    )
    assert expanded.capacity_bytes == 2 << 30
    if leftover_server is not None:
        # A server pod left on a node that went away (no kubelet confirms its graceful
        # deletion): DeleteVolume must remove it, by force after the removal timeout.
        admin, namespace = leftover_server
        pod = {
            "metadata": {
                "name": objects.pod_name(volume.volume_id),
                "labels": objects.volume_labels(volume.volume_id, "node-gone"),
            },
            "spec": {
                "nodeName": "node-gone",
                "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "zerofs", "image": "ghcr.io/barre/zerofs:2.3.0"}],
            },
        }
        call_json(client.CoreV1Api(admin).create_namespaced_pod, namespace, pod)
    controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=SECRETS)
    )
    assert not controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries


def _restore_life(
    controller: csi_pb2_grpc.ControllerStub, admin: client.ApiClient, namespace: str
) -> None:
    """A volume created from a snapshot: its restore pod created, stepped again after a
    pause (marked), followed until kubelet (here the test) says it succeeded, then
    removed; the volume deleted. The claim is told of the restore."""
    snapshot = SnapshotRecord(
        key="snap-rbac",
        name="snap-rbac",
        snapshot_id="pvc-0a1b2c3d@snap-rbac",
        source_volume_id="pvc-0a1b2c3d",
        checkpoint_id="0b7f6a1e-checkpoint",
        size_bytes=1 << 30,
        created_at_seconds=1_700_000_000,
        parameters={"storageUrl": "s3://zerofs-chart-test/volumes"},
    )
    KubernetesSnapshotStore(admin, namespace).create(snapshot)
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-6f0e1d2c-3b4a-4958-8776-a5b4c3d2e1f0",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
        volume_capabilities=[_mount_capability()],
        parameters={
            "storageUrl": "s3://zerofs-chart-test/volumes",
            PVC_NAME_KEY: "restored",
            PVC_NAMESPACE_KEY: namespace,
        },
        secrets=SECRETS,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
        ),
    )
    with pytest.raises(grpc.RpcError) as in_progress:
        controller.CreateVolume(request)
    assert in_progress.value.code() is grpc.StatusCode.UNAVAILABLE
    (pod,) = call_json(client.CoreV1Api(admin).list_namespaced_pod, namespace)["items"]
    name = pod["metadata"]["name"]
    pod["metadata"]["annotations"][job_pods.ANNOTATION_LAST_STEP] = "0"
    pod = call_json(client.CoreV1Api(admin).replace_namespaced_pod, name, namespace, pod)
    with pytest.raises(grpc.RpcError) as in_progress:
        controller.CreateVolume(request)
    pod = call_json(client.CoreV1Api(admin).read_namespaced_pod, name, namespace)
    assert pod["metadata"]["annotations"][job_pods.ANNOTATION_LAST_STEP] != "0"
    pod["status"] = {"phase": "Succeeded"}
    call_json(client.CoreV1Api(admin).replace_namespaced_pod_status, name, namespace, pod)
    volume = controller.CreateVolume(request).volume
    assert volume.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert not call_json(client.CoreV1Api(admin).list_namespaced_pod, namespace)["items"]
    controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=SECRETS)
    )


def test_controller_calls_are_exactly_the_chart_controller_role(
    helm: Helm, cluster: Cluster, tmp_path: Path
) -> None:
    since = _calls_so_far(cluster)
    admin = _admin(cluster)
    # A ConfigMap of the Go driver's kind, for configMapName.
    call_json(
        client.CoreV1Api(admin).create_namespaced_config_map,
        cluster.namespace,
        {"metadata": {"name": "zerofs-settings"}, "data": {"zerofsImage": ""}},
    )
    # node-a, where the kubelet registered the node plugin.
    call_json(
        client.StorageV1Api(admin).create_csi_node,
        {
            "metadata": {"name": "node-a"},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": "node-a"}]},
        },
    )
    # node-a's node plugin, carrying out its checkpoint requests (as the admin: only
    # the controller's calls are checked here).
    worker = CheckpointRequestWorker(
        admin,
        namespace=cluster.namespace,
        node_name="node-a",
        socket_root=tmp_path / "sockets",
        locks=VolumeLocks(),
        is_staged=RecordStore(tmp_path / "node").is_staged,
        mounted_filesystem=RecordStore(tmp_path / "node").mounted_filesystem,
    ).start()
    with contextlib.ExitStack() as stack:
        stack.callback(worker.stop)
        controller = stack.enter_context(_controller(cluster, tmp_path))
        _volume_life(
            controller,
            "pvc-5d1c9a64-0f1e-4c55-9b7e-2d1f3c4b5a69",
            leftover_server=(admin, cluster.namespace),
        )
        _restore_life(controller, admin, cluster.namespace)
        # Whether configMapName is resolved depends on how the controller is wired; any
        # API call it makes for it must be covered all the same.
        with contextlib.suppress(grpc.RpcError):
            _volume_life(
                controller,
                "pvc-8e2f0b75-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
                configMapName="zerofs-settings",
            )

    manifests = helm.render(CHART)
    served = _served(cluster, since)
    # Events go on claims, which live in any namespace: the ClusterRole grants them.
    on_claims = {call for call in served if call == ("create", "", "events")}
    assert on_claims, "the restore told its claim nothing"
    for kind, needed in (
        ("Role", _namespaced(served) - on_claims),
        ("ClusterRole", _namespaced(served, False) | on_claims),
    ):
        granted = _granted(find(manifests, kind, "-controller"))
        assert needed - granted == set(), f"calls the chart's controller {kind} does not grant"
        assert granted - needed == set(), f"rules of the {kind} the controller never needed"


def test_controller_roles_are_the_controller_rbac_rules(helm: Helm) -> None:
    manifests = helm.render(CHART)
    role = find(manifests, "Role", "-controller")
    cluster_role = find(manifests, "ClusterRole", "-controller")
    assert role["rules"] == [dict(rule) for rule in CONTROLLER_PLUGIN_RULES]
    assert cluster_role["rules"] == [dict(rule) for rule in CONTROLLER_PLUGIN_CLUSTER_RULES]
    binding = find(manifests, "ClusterRoleBinding", "-controller")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    account = find(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert [s["name"] for s in binding["subjects"]] == [account]


def test_node_events_on_claims_are_granted_by_the_node_cluster_role(
    helm: Helm, cluster: Cluster
) -> None:
    since = _calls_so_far(cluster)
    admin = _admin(cluster)
    for namespace in ("team-a", "default"):
        client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
    recorder = KubernetesEventRecorder(
        client.CoreV1Api(make_api_client(host=cluster.url)), "zerofs-csi-node", "node-a"
    )
    recorder.warning(
        "pvc-1", "StageRefused", "refused", {PVC_NAME_KEY: "data", PVC_NAMESPACE_KEY: "team-a"}
    )
    recorder.warning("pvc-2", "VolumeServerNotReady", "not ready", {})
    events = call_json(client.CoreV1Api(admin).list_event_for_all_namespaces)["items"]
    assert sorted(e["metadata"]["namespace"] for e in events) == ["default", "team-a"]

    manifests = helm.render(CHART)
    cluster_role = find(manifests, "ClusterRole", "-node")
    served = _served(cluster, since)
    assert served == {("create", "", "events")}
    assert _granted(cluster_role) == served
    # Cluster-wide because claims live in any namespace; bound to the node plugin only.
    binding = find(manifests, "ClusterRoleBinding", "-node")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
