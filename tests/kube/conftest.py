"""Fixtures: an API server (fake, or real when KUBEBUILDER_ASSETS is set), the node
DaemonSet, kubelet stand-ins and Kubernetes backends built against them."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from kube.cluster import (
    ASSETS_ENV,
    DAEMONSET,
    NODE,
    Cluster,
    RealApiServer,
    fake_cluster,
    real_cluster,
    start_real_apiserver,
)
from kube.kubelet import KubeletStandIn, ListeningSockets, Runtime
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.servers.pods.backend import KubernetesBackend
from zerofs_csi.servers.pods.owner import DaemonSetOwner, resolve_daemonset_owner
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings, parse_volume_settings

BACKEND_USER_AGENT = "zerofs-csi-node/test"

# Distinctive values, so that a leak anywhere can be found by searching for them.
SECRETS = VolumeSecrets(
    encryption_password="pw-Ki8Zx2mQ-never-logged",
    access_key_id="AKIAZEROFSTESTKEY7Q3",
    secret_access_key="sk-zerofs-test-9f8e7d6c5b4a",
)


def volume_settings(**parameters: str) -> VolumeSettings:
    return parse_volume_settings(
        {
            "storageUrl": "s3://zerofs-test/volumes",
            "s3Endpoint": "https://s3.example.test",
            "podReadyTimeoutSeconds": "20",
            **parameters,
        }
    )


def new_volume_id() -> str:
    return f"pvc-{uuid.uuid4()}"


@pytest.fixture(scope="session")
def real_apiserver() -> Iterator[RealApiServer]:
    assets = os.environ.get(ASSETS_ENV)
    if not assets:
        pytest.skip(f"{ASSETS_ENV} is not set: no kube-apiserver and etcd to run against")
    server = start_real_apiserver(Path(assets))
    yield server
    server.stop()


@pytest.fixture(params=["fake", "real"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if request.param == "fake":
        with fake_cluster() as fake:
            yield fake
    else:
        server = request.getfixturevalue("real_apiserver")
        with real_cluster(server) as real:
            yield real


@pytest.fixture
def admin(cluster: Cluster) -> client.ApiClient:
    return cluster.api_client()


@pytest.fixture
def daemonset(cluster: Cluster, admin: client.ApiClient) -> dict[str, Any]:
    return cluster.create_daemonset(admin)


@pytest.fixture
def owner(cluster: Cluster, admin: client.ApiClient, daemonset: dict[str, Any]) -> DaemonSetOwner:
    return resolve_daemonset_owner(admin, cluster.namespace, daemonset_name=DAEMONSET)


@pytest.fixture
def socket_root() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="zk-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def kubelets(
    cluster: Cluster, admin: client.ApiClient, tmp_path: Path
) -> Iterator[Callable[..., KubeletStandIn]]:
    started: list[KubeletStandIn] = []
    journal: list[tuple[float, str, str, str, str]] = []

    def start(node: str = NODE, runtime: Runtime | None = None, **options: Any) -> KubeletStandIn:
        kubelet = KubeletStandIn(
            api=admin,
            namespace=cluster.namespace,
            node=node,
            runtime=runtime or ListeningSockets(),
            workdir=tmp_path / f"kubelet-{node}",
            journal=journal,
            **options,
        ).start()
        started.append(kubelet)
        return kubelet

    yield start
    for kubelet in started:
        kubelet.stop()


@pytest.fixture
def make_backend(
    cluster: Cluster, owner: DaemonSetOwner, socket_root: Path
) -> Callable[..., KubernetesBackend]:
    def make(
        *, api: client.ApiClient | None = None, registry: CollectorRegistry | None = None, **kw: Any
    ) -> KubernetesBackend:
        if api is None:
            api = cluster.api_client()
        api.user_agent = BACKEND_USER_AGENT
        registry = registry or CollectorRegistry()
        options: dict[str, Any] = {
            "namespace": cluster.namespace,
            "node_name": NODE,
            "socket_root": socket_root,
            "owner": owner,
            "metrics": Metrics(NODE, registry),
            "removal_timeout": 10.0,
            "forced_removal_timeout": 10.0,
        }
        options.update(kw)
        return KubernetesBackend(api, **options)

    return make
