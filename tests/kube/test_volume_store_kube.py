"""Volume records as ConfigMaps: the store contract and the API-specific behaviour.

Runs against the API servers of the shared ``cluster`` fixture (tests/kube/conftest.py):
the in-process fake, and a real kube-apiserver when ``KUBEBUILDER_ASSETS`` is set. Each
test works in a namespace of its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry
from unit.test_volume_store import StoreContract, content, make_record

from kube.cluster import Cluster
from zerofs_csi import errors
from zerofs_csi.controller.nodes import LocalNodes
from zerofs_csi.controller.service import ControllerService
from zerofs_csi.controller.store import VolumeStore
from zerofs_csi.controller.store_kube import (
    RECORD_KEY,
    KubernetesConfigMapReader,
    KubernetesVolumeStore,
    config_map_name,
)
from zerofs_csi.csi import csi_pb2
from zerofs_csi.kube import api as kube_api
from zerofs_csi.observability.metrics import Metrics


@pytest.fixture
def namespace(cluster: Cluster) -> str:
    name = f"meta-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api_client()).create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


def read_config_map(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    response = core.read_namespaced_config_map(name, namespace, _preload_content=False)
    return dict(json.loads(response.data))


class TestKubernetesVolumeStore(StoreContract):
    @pytest.fixture
    def store(self, cluster: Cluster, namespace: str) -> VolumeStore:
        return KubernetesVolumeStore(cluster.api_client(), namespace)

    @pytest.fixture
    def reopen(self, cluster: Cluster, namespace: str) -> Callable[[], VolumeStore]:
        # A new client as well: a restarted controller shares nothing with the old one.
        return lambda: KubernetesVolumeStore(cluster.api_client(), namespace)


def test_one_labelled_config_map_per_volume(
    cluster: Cluster, namespace: str, core: client.CoreV1Api
) -> None:
    store = KubernetesVolumeStore(cluster.api_client(), namespace)
    record = store.create(make_record("pvc-1", published_node="node-a"))
    obj = read_config_map(core, namespace, "zerofs-meta-pvc-1")
    assert config_map_name("pvc-1") == "zerofs-meta-pvc-1"
    assert obj["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "zerofs-csi",
        "app.kubernetes.io/component": "volume-metadata",
        "zerofs.csi.driver/volume": "pvc-1",
    }
    assert obj["metadata"]["resourceVersion"] == record.version
    assert list(obj["data"]) == [RECORD_KEY]
    stored = json.loads(obj["data"][RECORD_KEY])
    assert stored["volumeId"] == "pvc-1" and stored["publishedNode"] == "node-a"


def test_a_change_by_another_writer_aborts_the_update(
    cluster: Cluster, namespace: str, core: client.CoreV1Api
) -> None:
    """Another controller replica writes the ConfigMap between our read and our write."""
    store = KubernetesVolumeStore(cluster.api_client(), namespace)
    read = store.create(make_record())
    theirs = read_config_map(core, namespace, "zerofs-meta-pvc-1")
    body = json.loads(theirs["data"][RECORD_KEY])
    body["publishedNode"] = "node-b"
    theirs["data"][RECORD_KEY] = json.dumps(body)
    core.replace_namespaced_config_map("zerofs-meta-pvc-1", namespace, theirs)

    with pytest.raises(errors.Aborted, match="changed concurrently"):
        store.update(read.replace(published_node="node-a"))
    with pytest.raises(errors.Aborted, match="changed concurrently"):
        store.delete(read)
    current = store.get("pvc-1")
    assert current is not None and current.published_node == "node-b"


def test_a_writer_racing_inside_the_update_call_wins_and_ours_is_aborted(
    cluster: Cluster, namespace: str, core: client.CoreV1Api
) -> None:
    if cluster.fake is None:
        pytest.skip("injecting a write inside a request needs the in-process API server")
    store = KubernetesVolumeStore(cluster.api_client(), namespace)
    read = store.create(make_record())
    raced: list[str] = []

    def concurrent_writer(resource: str, ns: str, name: str) -> None:
        if raced or resource != "configmaps":
            return
        raced.append(name)
        other = KubernetesVolumeStore(cluster.api_client(), namespace)
        current = other.get("pvc-1")
        assert current is not None
        other.update(current.replace(capacity_bytes=2 << 30))

    cluster.fake.store.before_update.append(concurrent_writer)
    try:
        with pytest.raises(errors.Aborted):
            store.update(read.replace(published_node="node-a"))
    finally:
        cluster.fake.store.before_update.remove(concurrent_writer)
    assert raced == ["zerofs-meta-pvc-1"]
    assert content(store.get("pvc-1")) == make_record(capacity_bytes=2 << 30)


def test_list_ignores_other_config_maps_and_pages(
    cluster: Cluster,
    namespace: str,
    core: client.CoreV1Api,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = KubernetesVolumeStore(cluster.api_client(), namespace)
    for vid in ("pvc-3", "pvc-1", "pvc-2"):
        store.create(make_record(vid))
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "zerofs-meta-other"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "unrelated",
                "labels": {"app.kubernetes.io/managed-by": "zerofs-csi"},
            },
            "data": {"x": "y"},
        },
    )
    monkeypatch.setattr(kube_api, "LIST_PAGE", 2)
    assert [r.volume_id for r in store.list()] == ["pvc-1", "pvc-2", "pvc-3"]


def test_a_damaged_record_is_an_internal_error_naming_the_config_map(
    cluster: Cluster, namespace: str, core: client.CoreV1Api
) -> None:
    store = KubernetesVolumeStore(cluster.api_client(), namespace)
    store.create(make_record())
    obj = read_config_map(core, namespace, "zerofs-meta-pvc-1")
    obj["data"] = {RECORD_KEY: "{not json"}
    core.replace_namespaced_config_map("zerofs-meta-pvc-1", namespace, obj)
    with pytest.raises(errors.Internal, match=f"{namespace}/zerofs-meta-pvc-1"):
        store.get("pvc-1")


def test_an_unreachable_api_server_is_unavailable() -> None:
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: nothing listens
    configuration.retries = 0
    store = KubernetesVolumeStore(client.ApiClient(configuration), "zerofs")
    with pytest.raises(errors.Unavailable, match="cannot reach the Kubernetes API"):
        store.get("pvc-1")


def test_config_map_reader(cluster: Cluster, namespace: str, core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "legacy"}, "data": {"storageURL": "s3://b/p"}}
    )
    reader = KubernetesConfigMapReader(cluster.api_client(), namespace)
    assert reader("legacy") == {"storageURL": "s3://b/p"}
    with pytest.raises(errors.InvalidArgument, match=f"{namespace}/missing.*does not exist"):
        reader("missing")


def test_create_volume_resolves_config_map_name_through_the_api(
    cluster: Cluster, namespace: str, core: client.CoreV1Api
) -> None:
    """A Go-driver StorageClass: settings in a ConfigMap in the driver's namespace."""
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {"name": "zerofs-settings"},
            "data": {
                "storageURL": "s3://bucket/volumes",
                "awsEndpoint": "https://s3.example.net",
                "cacheDir": "/ignored",
            },
        },
    )
    api = cluster.api_client()
    service = ControllerService(
        KubernetesVolumeStore(api, namespace),
        Metrics("", CollectorRegistry()),
        nodes=LocalNodes([], 0),
        read_config_map=KubernetesConfigMapReader(api, namespace),
    )
    mount = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        volume_capabilities=[mount],
        parameters={"configMapName": "zerofs-settings", "filesystem": "xfs"},
    )
    volume = service.CreateVolume(request, None).volume  # type: ignore[arg-type]
    assert volume.volume_context["storageUrl"] == "s3://bucket/volumes"
    assert volume.volume_context["s3Endpoint"] == "https://s3.example.net"
    assert volume.volume_context["filesystem"] == "xfs"
    stored = read_config_map(core, namespace, "zerofs-meta-pvc-1")
    assert json.loads(stored["data"][RECORD_KEY])["volumeContext"] == dict(volume.volume_context)

    request.parameters["configMapName"] = "absent"
    request.name = "pvc-2"
    with pytest.raises(errors.InvalidArgument, match="absent.*does not exist"):
        service.CreateVolume(request, None)  # type: ignore[arg-type]
