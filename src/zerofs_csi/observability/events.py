"""Kubernetes Events: failures a user must act on (Warning), and the progress of work
that takes a user's claim minutes (Normal).

Kubelet already turns a failed NodeStage into an event on the user's pod; these events
land on the PersistentVolumeClaim (when the volume context names it) or else on the
PersistentVolume, where ``kubectl describe pvc`` shows them next to the volume, and they
stay after the pod is gone. Repeats of the same reason for the same volume within a
minute are dropped: the CO retries failing calls every few seconds. Messages carry text
from servers: each is one printable line within the API server's limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from zerofs_csi.observability.sanitize import REDACTOR, printable
from zerofs_csi.volume.context import PVC_NAME_KEY, PVC_NAMESPACE_KEY

log = logging.getLogger(__name__)

REPEAT_WINDOW_S = 60.0
# Event messages are limited to 1 KiB by the API server's validation (bytes, as Go counts).
MAX_MESSAGE_BYTES = 1024


def event_message(message: str) -> str:
    return printable(REDACTOR.redact(message), MAX_MESSAGE_BYTES)


class EventRecorder(Protocol):
    def warning(
        self, volume_id: str, reason: str, message: str, context: Mapping[str, str]
    ) -> None: ...

    def normal(
        self, volume_id: str, reason: str, message: str, context: Mapping[str, str]
    ) -> None: ...


class _Throttle:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}

    def allow(self, volume_id: str, reason: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get((volume_id, reason))
            if last is not None and now - last < REPEAT_WINDOW_S:
                return False
            self._last[(volume_id, reason)] = now
            return True


class LogEventRecorder:
    """Without Kubernetes: the event is a log line."""

    def __init__(self) -> None:
        self._throttle = _Throttle()

    def warning(
        self, volume_id: str, reason: str, message: str, context: Mapping[str, str]
    ) -> None:
        self._log(logging.WARNING, volume_id, reason, message)

    def normal(self, volume_id: str, reason: str, message: str, context: Mapping[str, str]) -> None:
        self._log(logging.INFO, volume_id, reason, message)

    def _log(self, level: int, volume_id: str, reason: str, message: str) -> None:
        if self._throttle.allow(volume_id, reason):
            log.log(
                level,
                "event: %s",
                event_message(message),
                extra={"volume_id": volume_id, "reason": reason},
            )


class KubernetesEventRecorder:
    """Posts core/v1 Events; a failure to post is logged, never raised."""

    def __init__(self, core_api: object, component: str, host: str) -> None:
        self._core = core_api
        self._component = component
        self._host = host
        self._throttle = _Throttle()

    def warning(
        self, volume_id: str, reason: str, message: str, context: Mapping[str, str]
    ) -> None:
        self._post("Warning", volume_id, reason, message, context)

    def normal(self, volume_id: str, reason: str, message: str, context: Mapping[str, str]) -> None:
        self._post("Normal", volume_id, reason, message, context)

    def _post(
        self, kind: str, volume_id: str, reason: str, message: str, context: Mapping[str, str]
    ) -> None:
        if not self._throttle.allow(volume_id, reason):
            return
        pvc, pvc_namespace = context.get(PVC_NAME_KEY), context.get(PVC_NAMESPACE_KEY)
        if pvc and pvc_namespace:
            namespace = pvc_namespace
            involved = {"apiVersion": "v1", "kind": "PersistentVolumeClaim"}
            involved |= {"name": pvc, "namespace": pvc_namespace}
        else:
            # Events about cluster-scoped objects live in the default namespace.
            namespace = "default"
            involved = {"apiVersion": "v1", "kind": "PersistentVolume", "name": volume_id}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{volume_id}.", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": event_message(message),
            "type": kind,
            "source": {"component": self._component, "host": self._host},
            "reportingComponent": self._component,
            "reportingInstance": self._host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._core.create_namespaced_event(namespace, body)  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning(
                "could not post event",
                extra={"volume_id": volume_id, "reason": reason, "error": str(exc)},
            )
