"""The nodes a volume can be published to, and how many volumes each may have.

ControllerPublishVolume asks a ``NodeDirectory`` about the node before recording it:
a node that does not exist is NOT_FOUND, and a node at its attach limit is
RESOURCE_EXHAUSTED. ``LocalNodes`` serves the local backend, whose state lives in one
host's state directory, so it knows the one node given by ``--node-id`` and that node's
``--max-volumes-per-node``; ``node_directory_kube.CsiNodeDirectory`` reads the node's
CSINode, where the kubelet registered this driver's node plugin and its limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from zerofs_csi.errors import NotFound


class NodeDirectory(Protocol):
    def attach_limit(self, node_id: str) -> int:
        """How many volumes may be published to ``node_id`` at once, 0 for no limit.

        Raises NotFound when no such node runs this driver's node plugin.
        """
        ...


class LocalNodes:
    """The nodes of a local deployment: ``node_ids``, each taking ``max_volumes_per_node``."""

    def __init__(self, node_ids: Iterable[str], max_volumes_per_node: int) -> None:
        self._node_ids = frozenset(node_ids)
        self._limit = max_volumes_per_node

    def attach_limit(self, node_id: str) -> int:
        if node_id not in self._node_ids:
            known = ", ".join(sorted(self._node_ids)) or "none: start it with --node-id"
            raise NotFound(
                f"node {node_id!r} does not exist: the local backend publishes to the node "
                f"given by --node-id ({known})"
            )
        return self._limit
