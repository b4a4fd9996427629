"""Per-volume ZeroFS servers as pods pinned to this node (VolumeServerBackend).

Lifecycle of one volume's server:

1. The config Secret ``zerofs-config-<volume>`` is created, or updated from a fresh
   read with its resourceVersion; a 409 Conflict (someone else wrote in between) is
   retried from a new read with backoff, a bounded number of times.
2. Every pod of the volume that is not the one wanted is removed and confirmed gone
   before a new pod starts: a pod on another node, a pod of an older configuration, a
   terminating or finished pod. Two ZeroFS writers on one volume fence each other and
   one loses its writes.
3. The pod is created (or the existing one kept) and its readiness is awaited by
   watching it, up to the settings' pod-ready timeout. A pod that is already ready
   returns at once. On timeout the error quotes the pod's phase, conditions, container
   states and last events. The pod is left in place, so that the CO's retry of the
   call keeps waiting for the same pod (a slow image pull) instead of starting over.

Removal is bounded: delete with the pod's grace period, watch until it is gone, after
``removal_timeout`` delete with grace 0 and watch again for ``forced_removal_timeout``;
then the Secret goes. Each step is logged with structured fields and counted.

Every API request has a timeout (``api.REQUEST_TIMEOUT``; watches are bounded by the
time left), so no CSI call waits forever on the API server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from kubernetes import client, watch

from zerofs_csi import errors
from zerofs_csi.kube.api import REQUEST_TIMEOUT, Obj, api_failure, call_json, is_status
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.pods.owner import DaemonSetOwner
from zerofs_csi.servers.pods.status import (
    describe_pod,
    meta,
    name_of,
    node_of,
    phase_of,
    pod_is_ready,
    quote_events,
    terminating,
    uid_of,
)
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

log = logging.getLogger(__name__)

# Waiting less than the pod's own grace period would force-delete servers that are
# still flushing to the object store.
DEFAULT_REMOVAL_TIMEOUT = objects.TERMINATION_GRACE_SECONDS + 15.0
DEFAULT_FORCED_REMOVAL_TIMEOUT = 15.0
DEFAULT_CONFLICT_RETRIES = 6
# Read timeout of a watch beyond the server-side timeoutSeconds, so that the server
# ends the watch rather than the socket timing out.
WATCH_READ_SLACK = 10.0

PodCheck = Callable[[Obj | None], bool]


class KubernetesBackend:
    """Runs each volume's ZeroFS server as a pod on this node.

    ``socket_root`` must be the same path on the host and in the node plugin's
    container: the pods mount ``<socket_root>/<volume>`` from the host at that path.
    ``core`` replaces the CoreV1Api built from ``api`` (to instrument calls in tests).
    """

    name = "kubernetes"

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        node_name: str,
        socket_root: Path,
        owner: DaemonSetOwner | None,
        metrics: Metrics,
        removal_timeout: float = DEFAULT_REMOVAL_TIMEOUT,
        forced_removal_timeout: float = DEFAULT_FORCED_REMOVAL_TIMEOUT,
        conflict_retries: int = DEFAULT_CONFLICT_RETRIES,
        conflict_backoff: float = 0.05,
        core: client.CoreV1Api | None = None,
    ) -> None:
        if not socket_root.is_absolute():
            raise ValueError(f"socket root must be an absolute path: {socket_root}")
        self._core = core if core is not None else client.CoreV1Api(api)
        self._namespace = namespace
        self._node = node_name
        self._socket_root = socket_root
        self._owner = owner.reference() if owner is not None else None
        self._metrics = metrics
        self._removal_timeout = removal_timeout
        self._forced_removal_timeout = forced_removal_timeout
        self._conflict_retries = conflict_retries
        self._conflict_backoff = conflict_backoff
        self._removals = metrics.server_removals

    # ------------------------------------------------------------ interface

    def sockets(self, volume_id: str) -> ServerSockets:
        return ServerSockets.of_volume(self._socket_root, volume_id)

    def running(self) -> list[str]:
        try:
            pods = call_json(
                self._core.list_namespaced_pod,
                self._namespace,
                label_selector=objects.SERVER_SELECTOR,
                field_selector=f"spec.nodeName={self._node}",
            )
        except Exception as exc:
            raise api_failure(exc, "listing volume server pods") from None
        volumes = {
            (meta(p).get("labels") or {}).get(objects.LABEL_VOLUME) for p in pods.get("items", [])
        }
        return sorted(v for v in volumes if v)

    def ensure(self, volume_id: str, settings: object, secrets: object) -> ServerSockets:
        validate_volume_id(volume_id)
        if not isinstance(settings, VolumeSettings) or not isinstance(secrets, VolumeSecrets):
            raise errors.Internal("the Kubernetes backend needs VolumeSettings and VolumeSecrets")
        sockets = self.sockets(volume_id)
        rendered = render_zerofs_config(
            settings,
            volume_id,
            secrets,
            cache_dir=objects.CACHE_DIR,
            nbd_socket=str(sockets.nbd),
            ninep_socket=str(sockets.ninep),
            # Its admin service, beside the others in the node's host directory: the node
            # plugin takes checkpoints through it (node/checkpoint_requests.py).
            rpc_socket=str(sockets.admin),
        )
        REDACTOR.remember(list(rendered.secret_env.values()))
        secret = self._apply_secret(
            objects.config_secret(
                volume_id=volume_id,
                namespace=self._namespace,
                rendered=rendered,
                owner=self._owner,
            )
        )
        manifest = objects.volume_pod(
            volume_id=volume_id,
            namespace=self._namespace,
            node_name=self._node,
            settings=settings,
            sockets=sockets,
            secret_env_names=rendered.secret_env,
            secret_version=f"{uid_of(secret)}/{meta(secret).get('resourceVersion')}",
            config_text=rendered.toml_text,
            owner=self._owner,
        )
        wanted_hash = manifest["metadata"]["annotations"][objects.ANNOTATION_CONFIG_HASH]
        # A concurrent creator (a retried call racing this one) can take the name
        # between the check and the create: look again, a few times.
        for _ in range(3):
            pod = self._clear_the_way(volume_id, wanted_hash)
            if pod is None:
                self._prepare_socket_directory(sockets)
                try:
                    pod = call_json(self._core.create_namespaced_pod, self._namespace, manifest)
                except client.ApiException as exc:
                    if is_status(exc, 409):
                        continue
                    raise api_failure(exc, f"creating pod {objects.pod_name(volume_id)}") from None
                except Exception as exc:
                    raise api_failure(exc, f"creating pod {objects.pod_name(volume_id)}") from None
                log.info(
                    "volume server pod created",
                    extra=self._fields(volume_id, pod, step="create_pod"),
                )
            else:
                log.info(
                    "volume server pod reused",
                    extra=self._fields(volume_id, pod, step="reuse_pod", ready=pod_is_ready(pod)),
                )
            self._wait_ready(volume_id, pod, float(settings.pod_ready_timeout_seconds))
            self._check_sockets(volume_id, sockets)
            return sockets
        raise errors.Aborted(
            f"pod {self._namespace}/{objects.pod_name(volume_id)} kept being created "
            "concurrently; retry"
        )

    def stop(self, volume_id: str) -> None:
        validate_volume_id(volume_id)
        sockets = self.sockets(volume_id)
        with self._counted_removal() as results:
            pods = self._volume_pods(volume_id)
            results += [
                self._remove_pod(volume_id, pod, "volume server stopped")
                for pod in pods
                if node_of(pod) == self._node
            ]
            elsewhere = [p for p in pods if node_of(p) != self._node]
            if elsewhere:
                # Another node's server still mounts the Secret (a leftover that the
                # next ensure there or here will remove); it goes with the last pod.
                log.warning(
                    "config Secret kept: the volume has a server pod on another node",
                    extra=self._fields(
                        volume_id,
                        elsewhere[0],
                        step="delete_secret",
                        other_node=node_of(elsewhere[0]),
                    ),
                )
            else:
                self._delete_secret(volume_id)
            self._clean_socket_directory(volume_id, sockets)

    def remove_everywhere(self, volume_id: str) -> None:
        """Remove the volume's server pods on every node, then its config Secret.

        For DeleteVolume in the controller: nothing of the volume may keep running or
        writing once its data is gone. Bounded like ``stop``; succeeds when nothing is left.
        """
        validate_volume_id(volume_id)
        with self._counted_removal() as results:
            results += [
                self._remove_pod(volume_id, pod, "volume deleted")
                for pod in self._volume_pods(volume_id)
            ]
            self._delete_secret(volume_id)

    @contextlib.contextmanager
    def _counted_removal(self) -> Iterator[list[str]]:
        """Counts one removal: failed, or the strongest pod outcome collected in the list."""
        results: list[str] = []
        try:
            yield results
        except errors.CsiError:
            self._removals.labels(self._node, "failed").inc()
            raise
        outcome = next((o for o in ("forced", "graceful") if o in results), "absent")
        self._removals.labels(self._node, outcome).inc()

    # ------------------------------------------------------------ Secret

    def _apply_secret(self, desired: objects.Manifest) -> Obj:
        """Create the Secret or bring it to ``desired`` with a conditional update."""
        name = name_of(desired)
        what = f"writing Secret {self._namespace}/{name}"
        for attempt in range(self._conflict_retries):
            try:
                current = call_json(self._core.read_namespaced_secret, name, self._namespace)
            except client.ApiException as exc:
                if not is_status(exc, 404):
                    raise api_failure(exc, what) from None
                try:
                    return call_json(self._core.create_namespaced_secret, self._namespace, desired)
                except client.ApiException as create_exc:
                    if not is_status(create_exc, 409):
                        raise api_failure(create_exc, what, quote_server=False) from None
                    self._backoff(attempt)
                    continue
                except Exception as create_exc:
                    raise api_failure(create_exc, what, quote_server=False) from None
            except Exception as exc:
                raise api_failure(exc, what) from None
            if self._secret_is(current, desired):
                return current
            # Only this driver's fields change; whatever else others put on the
            # Secret (annotations, other owners) stays, and the resourceVersion read
            # makes the update conditional.
            current["data"] = desired["data"]
            metadata = current.setdefault("metadata", {})
            metadata["labels"] = {**(metadata.get("labels") or {}), **meta(desired)["labels"]}
            if self._owner is not None:
                others = [
                    ref
                    for ref in metadata.get("ownerReferences") or []
                    if ref.get("uid") != self._owner["uid"]
                ]
                metadata["ownerReferences"] = [*others, self._owner]
            try:
                return call_json(
                    self._core.replace_namespaced_secret, name, self._namespace, current
                )
            except client.ApiException as exc:
                if not is_status(exc, 409) and not is_status(exc, 404):
                    raise api_failure(exc, what, quote_server=False) from None
                log.info(
                    "config Secret changed while being updated; retrying from a fresh read",
                    extra={"secret": name, "attempt": attempt + 1, "status": exc.status},
                )
                self._backoff(attempt)
            except Exception as exc:
                raise api_failure(exc, what, quote_server=False) from None
        raise errors.Aborted(
            f"Secret {self._namespace}/{name} was changed by someone else during each of "
            f"{self._conflict_retries} update attempts; retry"
        )

    def _secret_is(self, current: Obj, desired: objects.Manifest) -> bool:
        labels = meta(current).get("labels") or {}
        owners = {ref.get("uid") for ref in meta(current).get("ownerReferences") or []}
        return (
            (current.get("data") or {}) == desired["data"]
            and all(labels.get(k) == v for k, v in meta(desired)["labels"].items())
            and (self._owner is None or self._owner["uid"] in owners)
        )

    def _backoff(self, attempt: int) -> None:
        delay = min(2.0, self._conflict_backoff * 2**attempt)
        time.sleep(delay * random.uniform(0.5, 1.0))

    def _delete_secret(self, volume_id: str) -> None:
        name = objects.secret_name(volume_id)
        try:
            call_json(self._core.delete_namespaced_secret, name, self._namespace)
        except client.ApiException as exc:
            if not is_status(exc, 404):
                raise api_failure(exc, f"deleting Secret {self._namespace}/{name}") from None
            log.debug("config Secret already absent", extra={"volume_id": volume_id})
            return
        except Exception as exc:
            raise api_failure(exc, f"deleting Secret {self._namespace}/{name}") from None
        log.info(
            "config Secret deleted",
            extra={"volume_id": volume_id, "secret": name, "step": "delete_secret"},
        )

    # ------------------------------------------------------------ pods

    def _volume_pods(self, volume_id: str) -> list[Obj]:
        """Every pod of the volume on any node: by label, plus one with the server's
        name but other labels (created by an older driver)."""
        name = objects.pod_name(volume_id)
        try:
            listed: list[Obj] = call_json(
                self._core.list_namespaced_pod,
                self._namespace,
                label_selector=objects.volume_selector(volume_id),
            ).get("items", [])
            if any(name_of(p) == name for p in listed):
                return listed
            named: list[Obj] = call_json(
                self._core.list_namespaced_pod,
                self._namespace,
                field_selector=f"metadata.name={name}",
            ).get("items", [])
        except Exception as exc:
            raise api_failure(exc, f"listing the pods of volume {volume_id}") from None
        return [*listed, *named]

    def _stale_reason(self, pod: Obj, volume_id: str, wanted_hash: str) -> str | None:
        """Why ``pod`` cannot serve the volume here, or None if it can."""
        annotations = meta(pod).get("annotations") or {}
        if name_of(pod) != objects.pod_name(volume_id):
            return "another server pod of the volume"
        if node_of(pod) != self._node:
            return f"on node {node_of(pod) or '(none)'}"
        if terminating(pod):
            return "terminating"
        if phase_of(pod) in ("Succeeded", "Failed"):
            return f"phase {phase_of(pod)}"
        if annotations.get(objects.ANNOTATION_CONFIG_HASH) != wanted_hash:
            return "started from another configuration"
        if self.sockets(volume_id).fenced.exists():
            return "its server was fenced by a newer writer of the volume"
        return None

    def _clear_the_way(self, volume_id: str, wanted_hash: str) -> Obj | None:
        """Remove every pod of the volume except a usable one, which is returned."""
        keep = None
        for pod in self._volume_pods(volume_id):
            reason = self._stale_reason(pod, volume_id, wanted_hash)
            if reason is None:
                keep = pod
                continue
            log.info(
                "removing a volume server pod before starting the new one",
                extra=self._fields(volume_id, pod, step="replace_pod", reason=reason),
            )
            self._remove_pod(volume_id, pod, reason)
        if keep is None:
            # The mark of a fenced server goes with its pod: the new pod starts ZeroFS.
            self.sockets(volume_id).fenced.unlink(missing_ok=True)
        return keep

    def _remove_pod(self, volume_id: str, pod: Obj, why: str) -> str:
        """Delete ``pod`` and wait until it is gone: 'graceful', 'forced' or 'gone' (it
        was already gone). Raises Unavailable if even a forced delete is not confirmed."""
        name, uid = name_of(pod), uid_of(pod)
        fields = self._fields(volume_id, pod, reason=why)

        def gone(current: Obj | None) -> bool:
            return current is None or uid_of(current) != uid

        if not terminating(pod) and not self._delete_pod(name, uid, None):
            log.info("volume server pod already gone", extra={**fields, "step": "delete_pod"})
            return "gone"
        if self._watch_pod(name, gone, self._removal_timeout)[0]:
            log.info(
                "volume server pod stopped",
                extra={**fields, "step": "delete_pod", "outcome": "graceful"},
            )
            return "graceful"
        log.warning(
            "volume server pod still terminating after the removal timeout; force deleting",
            extra={**fields, "step": "force_delete_pod", "timeout_seconds": self._removal_timeout},
        )
        if not self._delete_pod(name, uid, 0):
            return "graceful"
        self._metrics.forced_pod_deletions.labels(self._node).inc()
        confirmed, last = self._watch_pod(name, gone, self._forced_removal_timeout)
        if not confirmed:
            log.error(
                "volume server pod still present after a forced deletion",
                extra={**fields, "step": "force_delete_pod", "outcome": "failed"},
            )
            raise errors.Unavailable(
                f"pod {self._namespace}/{name} is still present "
                f"{self._forced_removal_timeout:g}s after a forced deletion "
                f"({self._describe(last or pod)})"
            )
        log.warning(
            "volume server pod force deleted",
            extra={**fields, "step": "force_delete_pod", "outcome": "forced"},
        )
        return "forced"

    def _delete_pod(self, name: str, uid: str, grace: int | None) -> bool:
        """Delete the pod with this uid; False if it no longer exists."""
        options: Obj = {"preconditions": {"uid": uid}}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        try:
            call_json(self._core.delete_namespaced_pod, name, self._namespace, body=options)
        except client.ApiException as exc:
            # 409: the uid precondition failed, the name now belongs to another pod.
            if is_status(exc, 404) or is_status(exc, 409):
                return False
            raise api_failure(exc, f"deleting pod {self._namespace}/{name}") from None
        except Exception as exc:
            raise api_failure(exc, f"deleting pod {self._namespace}/{name}") from None
        return True

    def _watch_pod(self, name: str, done: PodCheck, timeout: float) -> tuple[bool, Obj | None]:
        """Watch the pod called ``name`` until ``done(pod or None)`` holds.

        Returns (True, pod) when it does, (False, last pod seen) after ``timeout``
        seconds. Lists first, then watches from the list's resourceVersion, so no
        change in between is missed; a watch that expires (410) or breaks is resumed
        with a new list.
        """
        deadline = time.monotonic() + timeout
        selector = f"metadata.name={name}"
        while True:
            try:
                listing = call_json(
                    self._core.list_namespaced_pod, self._namespace, field_selector=selector
                )
            except Exception as exc:
                raise api_failure(exc, f"reading pod {self._namespace}/{name}") from None
            items = listing.get("items") or []
            pod = items[0] if items else None
            if done(pod):
                return True, pod
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, pod
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self._core.list_namespaced_pod,
                    self._namespace,
                    field_selector=selector,
                    resource_version=meta(listing).get("resourceVersion"),
                    timeout_seconds=max(1, math.ceil(remaining)),
                    _request_timeout=(REQUEST_TIMEOUT[0], remaining + WATCH_READ_SLACK),
                ):
                    pod = None if event["type"] == "DELETED" else event["raw_object"]
                    if done(pod):
                        stream.stop()
                        return True, pod
                    if time.monotonic() >= deadline:
                        stream.stop()
                        return False, pod
            except client.ApiException as exc:
                if not is_status(exc, 410):
                    raise api_failure(exc, f"watching pod {self._namespace}/{name}") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                log.debug("pod watch broke; listing again", extra={"pod": name, "error": str(exc)})
                if time.monotonic() < deadline:
                    time.sleep(0.2)

    def _wait_ready(self, volume_id: str, pod: Obj, timeout: float) -> None:
        name, uid = name_of(pod), uid_of(pod)

        def settled(current: Obj | None) -> bool:
            return (
                current is None
                or uid_of(current) != uid
                or terminating(current)
                or phase_of(current) in ("Succeeded", "Failed")
                or pod_is_ready(current)
            )

        started = time.monotonic()
        done, last = self._watch_pod(name, settled, timeout)
        ready = done and last is not None and uid_of(last) == uid and pod_is_ready(last)
        if ready and last is not None and not terminating(last):
            log.info(
                "volume server pod ready",
                extra=self._fields(
                    volume_id,
                    last,
                    step="wait_ready",
                    seconds=round(time.monotonic() - started, 3),
                ),
            )
            return
        where = f"volume server pod {self._namespace}/{name}"
        if not done:
            raise errors.DeadlineExceeded(
                f"{where} not ready after {timeout:g}s: {self._describe(last or pod)}"
            )
        if last is None or uid_of(last) != uid:
            raise errors.Unavailable(f"{where} was deleted while waiting for it to become ready")
        raise errors.Unavailable(f"{where} stopped before becoming ready: {self._describe(last)}")

    def _describe(self, pod: Obj) -> str:
        return describe_pod(pod, self._last_events(pod))

    def _last_events(self, pod: Obj) -> str:
        try:
            events: list[Obj] = call_json(
                self._core.list_namespaced_event,
                self._namespace,
                field_selector=f"involvedObject.uid={uid_of(pod)}",
            ).get("items", [])
        except Exception as exc:
            return f"unavailable ({api_failure(exc, 'listing events').message})"
        if not events:
            return "none"

        return quote_events(events)

    # ------------------------------------------------------------ host sockets

    def _prepare_socket_directory(self, sockets: ServerSockets) -> None:
        """Create the volume's socket directory for the ZeroFS user; remove sockets
        left by an earlier server (none runs for the volume on this node now)."""
        try:
            sockets.directory.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(sockets.directory, objects.ZEROFS_UID, objects.ZEROFS_UID)
            sockets.directory.chmod(0o770)
            for path in (sockets.nbd, sockets.ninep, sockets.admin, sockets.lives):
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise errors.Internal(
                f"preparing the socket directory {sockets.directory}: {exc.strerror}"
            ) from None

    def _clean_socket_directory(self, volume_id: str, sockets: ServerSockets) -> None:
        """Remove the socket directory once no server of the volume runs here."""
        for path in (sockets.nbd, sockets.ninep, sockets.admin, sockets.lives):
            path.unlink(missing_ok=True)
        try:
            sockets.directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(
                "socket directory not removed",
                extra={"volume_id": volume_id, "path": str(sockets.directory), "error": str(exc)},
            )

    def _check_sockets(self, volume_id: str, sockets: ServerSockets) -> None:
        for what, path in (("NBD", sockets.nbd), ("9P", sockets.ninep)):
            try:
                is_socket = stat.S_ISSOCK(path.stat().st_mode)
            except OSError:
                is_socket = False
            if not is_socket:
                raise errors.Unavailable(
                    f"volume server pod {objects.pod_name(volume_id)} is ready but its {what} "
                    f"socket {path} is not visible to the node plugin: the socket root must be "
                    "the same host directory in the plugin's container and on the host"
                )

    # ------------------------------------------------------------ logging

    def _fields(self, volume_id: str, pod: Obj, **more: object) -> dict[str, object]:
        return {
            "volume_id": volume_id,
            "pod": name_of(pod),
            "pod_uid": uid_of(pod),
            "pod_node": node_of(pod),
            "node": self._node,
            **more,
        }
