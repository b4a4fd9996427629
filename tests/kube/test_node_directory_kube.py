"""Nodes and their attach limits from CSINode objects, as the kubelet registers them.

Runs against the API servers of the shared ``cluster`` fixture (the in-process fake,
and a real kube-apiserver when ``KUBEBUILDER_ASSETS`` is set).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from kube.cluster import Cluster
from zerofs_csi import errors
from zerofs_csi.controller.nodes_kube import CsiNodeDirectory
from zerofs_csi.kube.api import call_json

DRIVER = "zerofs.csi.driver"


@pytest.fixture
def add_csinode(cluster: Cluster) -> Callable[..., str]:
    storage = client.StorageV1Api(cluster.api_client())

    def add(*drivers: dict[str, Any]) -> str:
        # CSINodes are cluster-scoped: a name of its own keeps tests apart.
        name = f"node-{uuid.uuid4().hex[:8]}"
        listed = [{"nodeID": name, **driver} for driver in drivers]
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode",
            "metadata": {"name": name},
            "spec": {"drivers": listed},
        }
        call_json(storage.create_csi_node, body)
        return name

    return add


@pytest.fixture
def nodes(cluster: Cluster) -> CsiNodeDirectory:
    return CsiNodeDirectory(cluster.api_client(), DRIVER)


def test_a_node_reports_the_limit_its_plugin_registered(
    nodes: CsiNodeDirectory, add_csinode: Callable[..., str]
) -> None:
    limited = add_csinode(
        {"name": "other.csi.example", "allocatable": {"count": 99}},
        {"name": DRIVER, "allocatable": {"count": 3}},
    )
    unlimited = add_csinode({"name": DRIVER})
    assert nodes.attach_limit(limited) == 3
    assert nodes.attach_limit(unlimited) == 0


def test_a_node_without_a_csinode_does_not_exist(nodes: CsiNodeDirectory) -> None:
    with pytest.raises(errors.NotFound, match="node 'node-gone' does not exist"):
        nodes.attach_limit("node-gone")


def test_a_node_where_this_driver_is_not_registered_does_not_exist(
    nodes: CsiNodeDirectory, add_csinode: Callable[..., str]
) -> None:
    bare = add_csinode()
    other_driver = add_csinode({"name": "other.csi.example"})
    for name in (bare, other_driver):
        with pytest.raises(errors.NotFound, match=f"{name}.*no {DRIVER} node plugin"):
            nodes.attach_limit(name)


def test_a_node_id_must_be_the_one_the_plugin_registered(
    nodes: CsiNodeDirectory, add_csinode: Callable[..., str]
) -> None:
    # The node id the plugin reported is another name than the node's.
    name = add_csinode({"name": DRIVER, "nodeID": "some-other-id"})
    with pytest.raises(errors.NotFound, match="no such driver with that node id"):
        nodes.attach_limit(name)
