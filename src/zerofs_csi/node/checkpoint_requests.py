"""The node plugin's side of checkpoints on the Kubernetes backend: it carries out the
CheckpointRequests for its own node (``kube.checkpoint_requests``).

It watches the requests labelled for this node (``node_selector``; their ``spec.node``
is checked too), and for each one without a status takes or deletes the checkpoint
through the admin socket of the volume's server pod (in this node's host directory),
under the volume's lock as a node call would, and writes the outcome into the request's
status: Succeeded with the checkpoint's id and time, or Failed with the error's gRPC
code and message. It acts only on volumes staged here: a request naming any other
volume fails, saying so. A mounted filesystem is frozen for the checkpoint
(``servers.checkpoint``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from kubernetes import client, watch

from zerofs_csi import errors
from zerofs_csi.kube import checkpoint_requests as requests
from zerofs_csi.kube.api import REQUEST_TIMEOUT, Obj, api_failure, call_json, is_status
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.checkpoint import Mounted, delete_checkpoint, take_checkpoint
from zerofs_csi.volume.id import validate_volume_id

log = logging.getLogger(__name__)

# A watch is ended by the server after this long and started again from a new list.
WATCH_SECONDS = 300
WATCH_READ_SLACK = 10.0
# Pause after a failed list or watch before the next.
RETRY_SECONDS = 2.0


class CheckpointRequestWorker:
    """Carries out this node's CheckpointRequests in ``namespace``, on a thread of its
    own between ``start`` and ``stop``. ``is_staged`` and ``mounted_filesystem`` read
    the node's stage records; ``locks`` are the node service's volume locks."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        node_name: str,
        socket_root: Path,
        locks: VolumeLocks,
        is_staged: Callable[[str], bool],
        mounted_filesystem: Callable[[str], Mounted | None],
    ) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._namespace = namespace
        self._node = node_name
        self._socket_root = socket_root
        self._locks = locks
        self._is_staged = is_staged
        self._mounted_filesystem = mounted_filesystem
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-requests", daemon=True)

    def start(self) -> CheckpointRequestWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        # Watch.stop ends a stream it is reading; one that has not sent its request yet
        # starts unstopped (stream() clears the flag) and would block until the server's
        # timeout: stopped again until the thread has gone.
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self._watch is not None:
                self._watch.stop()
            self._thread.join(0.1)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._list_and_watch()
            except errors.CsiError as exc:
                log.warning(
                    "checkpoint requests: list or watch failed; retrying",
                    extra={"node": self._node, "error": exc.message},
                )
                self._stopping.wait(RETRY_SECONDS)

    def _list_and_watch(self) -> None:
        selector = requests.node_selector(self._node)
        try:
            listing = call_json(
                self._custom.list_namespaced_custom_object,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                label_selector=selector,
            )
        except Exception as exc:
            raise api_failure(exc, "listing checkpoint requests") from None
        for item in listing.get("items") or []:
            self.handle(item)
        self._watch = watch.Watch()
        try:
            for event in self._watch.stream(
                self._custom.list_namespaced_custom_object,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                label_selector=selector,
                resource_version=(listing.get("metadata") or {}).get("resourceVersion"),
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + WATCH_READ_SLACK),
            ):
                if self._stopping.is_set():
                    break
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.handle(event["raw_object"])
        except client.ApiException as exc:
            if not is_status(exc, 410):  # expired: list again
                raise api_failure(exc, "watching checkpoint requests") from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if not self._stopping.is_set():
                log.debug(
                    "checkpoint request watch broke; listing again", extra={"error": str(exc)}
                )
        finally:
            self._watch.stop()

    # ------------------------------------------------------------ one request

    def handle(self, obj: Obj) -> None:
        """Carry out the request ``obj`` unless it has an outcome already."""
        if (obj.get("status") or {}).get("phase") or obj["metadata"].get("deletionTimestamp"):
            return
        request = requests.CheckpointRequest.from_object(obj)
        if request.node != self._node:
            return  # another node's: the watch filters them out, this makes sure
        fields = {
            "volume_id": request.volume_id,
            "request": request.name,
            "operation": request.operation,
            "checkpoint": request.checkpoint,
        }
        try:
            status = self._carry_out(request)
            log.info("checkpoint request done", extra=fields)
        except errors.CsiError as exc:
            status = requests.failed(exc)
            log.warning("checkpoint request failed", extra={**fields, "error": exc.message})
        body = {**obj, "status": status}
        try:
            call_json(
                self._custom.replace_namespaced_custom_object_status,
                requests.GROUP,
                requests.VERSION,
                self._namespace,
                requests.PLURAL,
                request.name,
                body,
            )
        except Exception as exc:
            # Deleted meanwhile (the controller gave up on it), or changed: a changed
            # request comes back through the watch.
            if is_status(exc, 404) or is_status(exc, 409):
                return
            log.warning(
                "checkpoint request status not written",
                extra={**fields, "error": api_failure(exc, "writing its status").message},
            )

    def _carry_out(self, request: requests.CheckpointRequest) -> Obj:
        # Checked before it names any path here.
        volume_id = validate_volume_id(request.volume_id)
        with self._locks.hold(volume_id, f"checkpoint {request.operation.lower()}"):
            if not self._is_staged(volume_id):
                raise errors.FailedPrecondition(
                    f"volume {volume_id} is not staged on node {self._node}, whose plugin "
                    "takes checkpoints only of volumes staged there"
                )
            sockets = ServerSockets.of_volume(self._socket_root, volume_id)
            with AdminClient(sockets.admin, f"server of volume {volume_id}") as server:
                if request.operation == requests.CREATE:
                    info = take_checkpoint(
                        server, volume_id, request.checkpoint, self._mounted_filesystem(volume_id)
                    )
                    return requests.succeeded(info.id, int(info.created_at.timestamp()))
                if request.operation == requests.DELETE:
                    delete_checkpoint(server, request.checkpoint)
                    return requests.succeeded()
        raise errors.InvalidArgument(f"unknown checkpoint operation {request.operation!r}")
