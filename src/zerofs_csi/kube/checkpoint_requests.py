"""CheckpointRequest objects: how the controller asks a node plugin for a checkpoint.

On the Kubernetes backend a volume's server runs in a pod on the node that staged the
volume, its admin socket in that node's host directory, out of the controller's reach.
So CreateSnapshot and DeleteSnapshot each write a CheckpointRequest (the chart's
``crds/checkpointrequests.yaml``) in the driver's namespace naming the volume, the
checkpoint, the operation and the node; the node plugin of that node carries it out and
writes the outcome into the object's status subresource, which the controller reads.

A request's name is a hash of what it asks (operation, volume, checkpoint), so a
retried call finds the request its first attempt made. Only the controller creates and
deletes requests; node plugins read them and write their status (kube.rbac,
kube.controller_rbac).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import grpc

from zerofs_csi import DRIVER_NAME, errors

GROUP = DRIVER_NAME
VERSION = "v1alpha1"
PLURAL = "checkpointrequests"
KIND = "CheckpointRequest"

CREATE = "Create"
DELETE = "Delete"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

Obj = dict[str, Any]


# The node a request is for, as a label the node plugin selects on: a hash, since a node
# name may be longer than a label value (63 characters). A label selector works on every
# API server, where a field selector on a custom resource needs selectableFields (1.31).
LABEL_NODE = f"{DRIVER_NAME}/node-hash"


def node_label(node: str) -> str:
    return hashlib.sha256(node.encode()).hexdigest()[:40]


def node_selector(node: str) -> str:
    """The label selector of the requests for ``node``."""
    return f"{LABEL_NODE}={node_label(node)}"


def request_name(operation: str, volume_id: str, checkpoint: str) -> str:
    """The request's object name: the same for every attempt of one call."""
    digest = hashlib.sha256(f"{operation}\0{volume_id}\0{checkpoint}".encode()).hexdigest()
    return f"{operation.lower()}-{digest[:40]}"


@dataclass(frozen=True)
class CheckpointRequest:
    name: str
    operation: str  # CREATE or DELETE
    volume_id: str
    checkpoint: str
    node: str

    def manifest(self) -> Obj:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": self.name, "labels": {LABEL_NODE: node_label(self.node)}},
            "spec": {
                "operation": self.operation,
                "volumeId": self.volume_id,
                "checkpoint": self.checkpoint,
                "node": self.node,
            },
        }

    @classmethod
    def from_object(cls, obj: Obj) -> CheckpointRequest:
        spec = obj.get("spec") or {}
        return cls(
            name=str(obj.get("metadata", {}).get("name", "")),
            operation=str(spec.get("operation", "")),
            volume_id=str(spec.get("volumeId", "")),
            checkpoint=str(spec.get("checkpoint", "")),
            node=str(spec.get("node", "")),
        )


def succeeded(checkpoint_id: str = "", created_at: int = 0) -> Obj:
    status: Obj = {"phase": SUCCEEDED}
    if checkpoint_id:
        status["checkpointId"] = checkpoint_id
        status["createdAt"] = created_at
    return status


def failed(error: errors.CsiError) -> Obj:
    return {"phase": FAILED, "code": error.code.name, "message": error.message}


def failure_of(status: Obj) -> errors.CsiError:
    """The error a Failed status records, with its gRPC code (INTERNAL if unknown)."""
    code = grpc.StatusCode.__members__.get(str(status.get("code")), grpc.StatusCode.INTERNAL)
    kind = next((k for k in errors.CsiError.__subclasses__() if k.code is code), errors.Internal)
    return kind(str(status.get("message") or "no message"))
