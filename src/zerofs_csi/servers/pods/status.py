"""What a volume server pod's object says: its name, node, phase and readiness, and why
it did not become ready (phase, conditions, container states, last events).
"""

from __future__ import annotations

from datetime import datetime

from zerofs_csi.kube.api import Obj

# Last events quoted when a pod does not become ready, and the length of each.
EVENTS_QUOTED = 5
EVENT_MESSAGE_MAX = 300


def meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def name_of(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def uid_of(obj: Obj) -> str:
    return str(meta(obj).get("uid", ""))


def node_of(pod: Obj) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


def phase_of(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase") or "Unknown")


def terminating(pod: Obj) -> bool:
    return meta(pod).get("deletionTimestamp") is not None


def pod_is_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def timestamp(text: object) -> float:
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def describe_pod(pod: Obj, last_events: str) -> str:
    """Phase, conditions, container states and ``last_events`` of a pod that did not
    become ready, for the error that says so."""
    status = pod.get("status") or {}
    parts = [f"phase {phase_of(pod)}"]
    conditions = [
        f"{c.get('type')}={c.get('status')}"
        + (f" ({c.get('reason')}: {c.get('message', '')})" if c.get("reason") else "")
        for c in status.get("conditions") or []
    ]
    parts.append("conditions: " + (", ".join(conditions) or "none"))
    containers = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    for container in containers:
        state = container.get("state") or {}
        if "waiting" in state:
            waiting = state["waiting"] or {}
            text = f"waiting ({waiting.get('reason')}: {waiting.get('message', '')})"
        elif "terminated" in state:
            ended = state["terminated"] or {}
            text = f"terminated (exit {ended.get('exitCode')}, {ended.get('reason')})"
        else:
            text = "running" if "running" in state else "unknown state"
        parts.append(
            f"container {container.get('name')}: {text}, "
            f"restarts {container.get('restartCount', 0)}"
        )
    parts.append("last events: " + last_events)
    return "; ".join(parts)


def quote_events(events: list[Obj]) -> str:
    """The last ``EVENTS_QUOTED`` events, oldest first, each cut to ``EVENT_MESSAGE_MAX``."""

    def when(event: Obj) -> float:
        return timestamp(
            event.get("lastTimestamp")
            or event.get("eventTime")
            or meta(event).get("creationTimestamp")
        )

    quoted = []
    for event in sorted(events, key=when)[-EVENTS_QUOTED:]:
        message = str(event.get("message") or "").strip()
        if len(message) > EVENT_MESSAGE_MAX:
            message = message[:EVENT_MESSAGE_MAX] + "..."
        count = event.get("count") or 0
        repeated = f" (x{count})" if count > 1 else ""
        quoted.append(f"{event.get('type')} {event.get('reason')}: {message}{repeated}")
    return " | ".join(quoted)
