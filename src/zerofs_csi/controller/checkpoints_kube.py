"""Checkpoints on the Kubernetes backend: requested through the API server and carried
out by the node plugin of the node where the volume is staged
(``kube.checkpoint_requests``, ``node.checkpoint_requests``).

CreateSnapshot and DeleteSnapshot write the request for the volume's node
(``VolumeRecord.published_node``) and wait a short while for its status; until the
node plugin has written it they answer UNAVAILABLE, which the external-snapshotter
retries, and the retry finds the same request by its name. Once the status says
Succeeded or Failed the request is deleted, so that a later call asks anew (a failure
keeps its gRPC code: a busy volume is ABORTED, a server not answering UNAVAILABLE). A
request left for another node (the volume moved) is replaced.

A volume staged nowhere has no server to take its checkpoint, and this backend starts
none for it: FAILED_PRECONDITION, the volume must be staged (in use by a pod).

Restores (CreateVolume from a snapshot or a volume) run in restore pods
(``restores_kube``) when the controller is given the image of their copy container.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.checkpoints import CheckpointSource
from zerofs_csi.controller.restores_kube import KubeRestores
from zerofs_csi.controller.store import VolumeStore
from zerofs_csi.kube import checkpoint_requests as requests
from zerofs_csi.kube.api import Obj, api_failure, call_json, is_status
from zerofs_csi.servers.admin import CheckpointInfo

log = logging.getLogger(__name__)

# How long one call waits for the node plugin before answering UNAVAILABLE.
DEFAULT_WAIT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.2


class KubeCheckpoints:
    """``VolumeCheckpoints`` through CheckpointRequests in ``namespace``; the volume's
    node is read from ``volumes``. ``custom`` replaces the CustomObjectsApi built from
    ``api`` (to instrument calls in tests). ``restorer`` fills new volumes; without one
    none is created from a snapshot or a volume."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        volumes: VolumeStore,
        *,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        custom: client.CustomObjectsApi | None = None,
        restorer: KubeRestores | None = None,
    ) -> None:
        self._restorer = restorer
        self.restores = restorer is not None
        self._custom = custom if custom is not None else client.CustomObjectsApi(api)
        self._namespace = namespace
        self._volumes = volumes
        self._wait_seconds = wait_seconds

    def create(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> CheckpointInfo:
        status = self._outcome(requests.CREATE, volume_id, name)
        try:
            checkpoint_id = str(status["checkpointId"])
            created_at = datetime.fromtimestamp(int(status["createdAt"]), UTC)
        except (KeyError, TypeError, ValueError):
            raise errors.Internal(
                f"the checkpoint request for {name!r} of volume {volume_id} succeeded without "
                f"the checkpoint's id and time: {status}"
            ) from None
        return CheckpointInfo(id=checkpoint_id, name=name, created_at=created_at)

    def delete(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> None:
        # A create request of the same checkpoint left uncollected would otherwise answer
        # a later CreateSnapshot of that name with the checkpoint deleted here.
        left = self._read(requests.request_name(requests.CREATE, volume_id, name))
        if left is not None:
            self._delete(left)
        self._outcome(requests.DELETE, volume_id, name)

    def restore(
        self,
        source: CheckpointSource,
        volume_id: str,
        parameters: Mapping[str, str],
        capacity_bytes: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        if self._restorer is None:
            raise errors.FailedPrecondition(
                f"volume {volume_id}: this controller creates no volume from a snapshot or a "
                "volume (it runs without --restore-image)"
            )
        self._restorer.fill(source, volume_id, parameters, capacity_bytes, csi_secrets)

    def _outcome(self, operation: str, volume_id: str, checkpoint: str) -> Obj:
        """The status of the node plugin's work on the request, once it is done."""
        record = self._volumes.get(volume_id)
        if record is None:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        node = record.published_node
        if not node:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is staged on no node: on the Kubernetes backend the node "
                "plugin where a volume is staged takes and deletes its checkpoints, so the "
                "volume must be in use by a pod to be snapshotted or to have a snapshot deleted"
            )
        wanted = requests.CheckpointRequest(
            requests.request_name(operation, volume_id, checkpoint),
            operation,
            volume_id,
            checkpoint,
            node,
        )
        current = self._read(wanted.name)
        if current is not None and requests.CheckpointRequest.from_object(current) != wanted:
            log.info(
                "replacing a checkpoint request left for another node",
                extra={"volume_id": volume_id, "request": wanted.name, "node": node},
            )
            self._delete(current)
            current = None
        if current is None:
            current = self._create(wanted)
        deadline = time.monotonic() + self._wait_seconds
        while True:
            status = current.get("status") or {}
            if status.get("phase") in (requests.SUCCEEDED, requests.FAILED):
                self._delete(current)
                if status["phase"] == requests.FAILED:
                    raise requests.failure_of(status)
                return status
            if time.monotonic() >= deadline:
                raise errors.Unavailable(
                    f"checkpoint request {self._namespace}/{wanted.name} ({operation} "
                    f"checkpoint {checkpoint!r} of volume {volume_id}) waits for the node "
                    f"plugin on node {node}: retry"
                )
            time.sleep(POLL_INTERVAL_SECONDS)
            found = self._read(wanted.name)
            if found is None:
                raise errors.Unavailable(
                    f"checkpoint request {self._namespace}/{wanted.name} was deleted while "
                    "waited for: retry"
                )
            current = found

    def _read(self, name: str) -> Obj | None:
        try:
            return call_json(
                self._custom.get_namespaced_custom_object,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                name,
            )
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise api_failure(exc, f"reading checkpoint request {self._namespace}/{name}") from None

    def _create(self, wanted: requests.CheckpointRequest) -> Obj:
        try:
            created = call_json(
                self._custom.create_namespaced_custom_object,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                wanted.manifest(),
            )
        except Exception as exc:
            if is_status(exc, 409):
                # A concurrent attempt made it between the read and the create.
                found = self._read(wanted.name)
                if found is not None:
                    return found
            raise api_failure(
                exc, f"creating checkpoint request {self._namespace}/{wanted.name}"
            ) from None
        log.info(
            "checkpoint request created",
            extra={
                "volume_id": wanted.volume_id,
                "request": wanted.name,
                "operation": wanted.operation,
                "node": wanted.node,
            },
        )
        return created

    def _delete(self, current: Obj) -> None:
        name = str(current["metadata"]["name"])
        uid = current["metadata"].get("uid")
        try:
            call_json(
                self._custom.delete_namespaced_custom_object,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                name,
                body={"preconditions": {"uid": uid}},
            )
        except Exception as exc:
            # Gone already, or the name is another request's now (409): nothing of ours.
            if is_status(exc, 404) or is_status(exc, 409):
                return
            raise api_failure(
                exc, f"deleting checkpoint request {self._namespace}/{name}"
            ) from None
