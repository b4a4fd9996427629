"""Restores on the Kubernetes backend: a new volume filled from a checkpoint by a restore
pod (``servers.pods.restore_pod``), followed across CreateVolume's retries.

A copy takes minutes to hours, longer than one CreateVolume call may wait, so ``fill``
is a step of a state machine kept in the API server, the pod ``zerofs-restore-<new
volume>`` being the state:

- no pod: create it and its Secret;
- a pod that restores something else (its ``restore-hash`` annotation differs: another
  source, capacity or config): delete it and answer retry;
- a pod being deleted: answer retry until it is gone;
- Running or Pending: report the copy's progress (its ``progress N`` lines, read from
  the copy container's log) and answer retry (``RestoreInProgress``, UNAVAILABLE,
  which the external-provisioner retries with the same name);
- Succeeded: delete the pod and its Secret; the CreateVolume goes on to record the
  volume;
- Failed: delete them and answer with the copy's error (``CODE: message`` in its
  termination message), or INTERNAL with the pod's reason; the next retry starts a new
  pod.

Each call waits a short while for the pod to end before answering. DeleteVolume of the
new volume removes a restore pod left behind (``remove``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.checkpoints import (
    CheckpointSource,
    CopyProgress,
    RestoreInProgress,
    progress_reporter,
    volume_secrets,
)
from zerofs_csi.kube.api import REQUEST_TIMEOUT, Obj, api_failure, call_json, is_status
from zerofs_csi.servers.pods import restore_pod
from zerofs_csi.servers.pods.restore_copy import progress_of
from zerofs_csi.volume.settings import parse_volume_settings

log = logging.getLogger(__name__)

DEFAULT_WAIT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.5
LOG_TAIL_LINES = 5


def _ignore(volume_id: str, percent: int | None) -> None:
    pass


def _restore_hash(pod: Obj) -> str | None:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(
        restore_pod.ANNOTATION_RESTORE_HASH
    )


def _copy_state(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == restore_pod.COPY_CONTAINER:
            return status.get("state") or {}
    return {}


def _failure(pod: Obj, volume_id: str) -> errors.CsiError:
    """The error a Failed restore pod ended with."""
    terminated = _copy_state(pod).get("terminated") or {}
    message = str(terminated.get("message") or "").strip()
    code, separator, text = message.partition(": ")
    if separator and code.isupper():
        return errors.of_code(code, f"restoring volume {volume_id}: {text}")
    status = pod.get("status") or {}
    why = message or status.get("message") or status.get("reason") or "no reason given"
    exit_code = terminated.get("exitCode")
    return errors.Internal(
        f"the restore pod of volume {volume_id} failed"
        + (f" (copy exited {exit_code})" if exit_code is not None else "")
        + f": {why}"
    )


def _waiting_reasons(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    reasons = []
    for container in (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    ):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
            reasons.append(f"{container.get('name')}: {waiting['reason']}")
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
            reasons.append(f"unschedulable: {condition.get('message', '')}")
    return reasons


class KubeRestores:
    """Fills new volumes through restore pods in ``namespace`` whose copy container runs
    ``copy_image`` (the plugin's image); ``copy_progress`` is told each progress read."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        copy_image: str,
        *,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        copy_progress: CopyProgress = _ignore,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._copy_image = copy_image
        self._wait_seconds = wait_seconds
        self._copy_progress = copy_progress

    def fill(
        self,
        source: CheckpointSource,
        volume_id: str,
        parameters: Mapping[str, str],
        capacity_bytes: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        """One step of the restore (see the module docstring): returns once the new
        volume holds the checkpoint's data; RestoreInProgress while it is copied."""
        restore = restore_pod.Restore(
            volume_id=volume_id,
            settings=parse_volume_settings(parameters),
            capacity_bytes=capacity_bytes,
            source_id=source.volume_id,
            source_settings=parse_volume_settings(source.parameters),
            checkpoint=source.checkpoint,
            secrets=volume_secrets(volume_id, csi_secrets),
        )
        wanted = restore_pod.restore_pod(restore, self._namespace, self._copy_image)
        name = restore_pod.pod_name(volume_id)
        what = f"restore pod {self._namespace}/{name}"
        current = self._read(name)
        if current is not None and _restore_hash(current) != _restore_hash(wanted):
            log.info("replacing a restore pod of another request", extra={"volume_id": volume_id})
            self.remove(volume_id)
            raise RestoreInProgress(f"{what} of another restore is being deleted: retry")
        if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
            raise RestoreInProgress(f"{what} is being deleted: retry")
        if current is None:
            current = self._create(restore, wanted)
        report = progress_reporter(volume_id, self._copy_progress)
        deadline = time.monotonic() + self._wait_seconds
        while True:
            phase = (current.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                self._copy_progress(volume_id, None)
                self.remove(volume_id)
                if phase == "Failed":
                    raise _failure(current, volume_id)
                log.info("restore pod succeeded", extra={"volume_id": volume_id, "pod": name})
                return
            percent = self._progress(name)
            if percent is not None:
                report(percent)
            if time.monotonic() >= deadline:
                state = ", ".join(_waiting_reasons(current)) or str(phase or "Pending")
                done = f", {percent}% copied" if percent is not None else ""
                raise RestoreInProgress(
                    f"volume {volume_id} is being filled from checkpoint {source.checkpoint!r} "
                    f"of volume {source.volume_id} by {what} ({state}{done}): retry"
                )
            time.sleep(POLL_INTERVAL_SECONDS)
            found = self._read(name)
            if found is None:
                raise RestoreInProgress(f"{what} was deleted while waited for: retry")
            current = found

    def remove(self, volume_id: str) -> None:
        """Delete the volume's restore pod and its Secret; succeeds when there are none."""
        name = restore_pod.pod_name(volume_id)
        for kind, delete in (
            ("pod", self._core.delete_namespaced_pod),
            ("Secret", self._core.delete_namespaced_secret),
        ):
            try:
                call_json(delete, name, self._namespace)
            except Exception as exc:
                if not is_status(exc, 404):
                    raise api_failure(
                        exc, f"deleting restore {kind} {self._namespace}/{name}"
                    ) from None

    def _create(self, restore: restore_pod.Restore, pod: Obj) -> Obj:
        name = pod["metadata"]["name"]
        try:
            created = call_json(self._core.create_namespaced_pod, self._namespace, pod)
        except Exception as exc:
            if is_status(exc, 409):
                raise RestoreInProgress(
                    f"restore pod {self._namespace}/{name} was created meanwhile: retry"
                ) from None
            raise api_failure(exc, f"creating restore pod {self._namespace}/{name}") from None
        owner = {"name": name, "uid": created["metadata"]["uid"]}
        secret = restore_pod.restore_secret(restore, self._namespace, owner)
        what = f"creating restore Secret {self._namespace}/{name}"
        for attempt in range(2):
            try:
                call_json(self._core.create_namespaced_secret, self._namespace, secret)
                break
            except Exception as exc:
                if attempt == 0 and is_status(exc, 409):
                    # One left by an earlier pod: it holds that pod's configs.
                    try:
                        call_json(self._core.delete_namespaced_secret, name, self._namespace)
                    except Exception as delete_exc:
                        if not is_status(delete_exc, 404):
                            raise api_failure(delete_exc, what) from None
                    continue
                self.remove(restore.volume_id)
                # The body holds secret values, which a validation message could echo.
                raise api_failure(exc, what, quote_server=False) from None
        log.info(
            "restore pod created",
            extra={
                "volume_id": restore.volume_id,
                "pod": name,
                "source": restore.source_id,
                "checkpoint": restore.checkpoint,
            },
        )
        return created

    def _read(self, name: str) -> Obj | None:
        try:
            return call_json(self._core.read_namespaced_pod, name, self._namespace)
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise api_failure(exc, f"reading restore pod {self._namespace}/{name}") from None

    def _progress(self, name: str) -> int | None:
        """The last percentage the copy container printed; None before it runs."""
        try:
            text = self._core.read_namespaced_pod_log(
                name,
                self._namespace,
                container=restore_pod.COPY_CONTAINER,
                tail_lines=LOG_TAIL_LINES,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except Exception as exc:
            # Not started, or no node yet: no progress to tell.
            log.debug("no progress of %s: %s", name, exc)
            return None
        found = [progress_of(line) for line in str(text).splitlines()]
        known = [percent for percent in found if percent is not None]
        return known[-1] if known else None
