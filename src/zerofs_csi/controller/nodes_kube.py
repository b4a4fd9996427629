"""The nodes of a Kubernetes cluster, as their CSINode objects describe them.

The kubelet keeps one CSINode per Node (same name, deleted with it) and adds a driver
entry when a CSI node plugin registers: its node id (``NodeGetInfo.node_id``, the node's
name for this driver) and its attach limit (``allocatable.count``, from
``NodeGetInfo.max_volumes_per_node``). A node without this driver's entry cannot stage
the volume, so it counts as absent.

API access the controller needs: csinodes get (cluster-scoped).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.kube.api import api_failure, call_json, is_status


class CsiNodeDirectory:
    """A ``NodeDirectory`` over the CSINode objects; ``storage`` replaces the
    StorageV1Api built from ``api`` (to instrument calls in tests)."""

    def __init__(
        self,
        api: client.ApiClient,
        driver_name: str,
        *,
        storage: client.StorageV1Api | None = None,
    ) -> None:
        self._storage = storage if storage is not None else client.StorageV1Api(api)
        self._driver_name = driver_name

    def attach_limit(self, node_id: str) -> int:
        try:
            csinode = call_json(self._storage.read_csi_node, node_id)
        except Exception as exc:
            if is_status(exc, 404):
                raise errors.NotFound(
                    f"node {node_id!r} does not exist (there is no CSINode {node_id!r})"
                ) from None
            raise api_failure(exc, f"reading CSINode {node_id}") from None
        for driver in _drivers(csinode):
            if driver.get("name") == self._driver_name and driver.get("nodeID") == node_id:
                allocatable = driver.get("allocatable")
                count = allocatable.get("count") if isinstance(allocatable, dict) else None
                return count if isinstance(count, int) and count > 0 else 0
        raise errors.NotFound(
            f"node {node_id!r} has no {self._driver_name} node plugin registered (its CSINode "
            "lists no such driver with that node id)"
        )


def _drivers(csinode: dict[str, Any]) -> list[dict[str, Any]]:
    spec = csinode.get("spec")
    drivers = spec.get("drivers") if isinstance(spec, dict) else None
    return [d for d in drivers or [] if isinstance(d, dict)]
