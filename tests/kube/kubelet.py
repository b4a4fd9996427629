"""A kubelet stand-in: runs the pods bound to one node and reports their status.

It watches the pods whose ``spec.nodeName`` is its node, "mounts" each pod's Secret
volumes and resolves its ``secretKeyRef`` environment from the API (as the kubelet
does), hands them to a runtime that starts the server, and once the runtime says the
server answers it writes the pod's status (Running, Ready) through the pods/status
subresource. When a pod gets a deletionTimestamp it stops the runtime and deletes the
pod with grace 0, the kubelet's final delete; ``finish_deletions=False`` plays a node
whose kubelet never confirms (a pod stuck terminating).

Every action is appended to ``journal`` as (monotonic time, node, action, pod, uid), so
tests can check the order of things across nodes.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import urllib3
from kubernetes import client, watch

from zerofs_csi.kube.api import call_json, is_status

Obj = dict[str, Any]


@dataclass
class MountedPod:
    """What the kubelet would give the pod's container."""

    directory: Path  # host directory holding the pod's Secret volume files
    files: dict[str, Path]  # container path -> host path
    env: dict[str, str]

    def config(self) -> dict[str, Any]:
        for container_path, host_path in self.files.items():
            if container_path.endswith("/config.toml"):
                return tomllib.loads(host_path.read_text())
        raise FileNotFoundError("the pod mounts no config.toml")


class Runtime(Protocol):
    def start(self, pod: Obj, mounted: MountedPod) -> None: ...

    def ready(self, pod: Obj) -> bool: ...

    def stop(self, pod: Obj) -> None: ...


class ListeningSockets:
    """A runtime whose "server" is a listening socket on each configured unix socket:
    enough for the backend's check that the sockets reached the host."""

    def __init__(self) -> None:
        self._sockets: dict[str, list[socket.socket]] = {}

    def start(self, pod: Obj, mounted: MountedPod) -> None:
        servers = mounted.config()["servers"]
        listening = []
        for kind in ("nbd", "ninep"):
            path = Path(servers[kind]["unix_socket"])
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(4)
            listening.append(sock)
        self._sockets[pod["metadata"]["uid"]] = listening

    def ready(self, pod: Obj) -> bool:
        return pod["metadata"]["uid"] in self._sockets

    def stop(self, pod: Obj) -> None:
        for sock in self._sockets.pop(pod["metadata"]["uid"], []):
            path = sock.getsockname()
            sock.close()
            Path(path).unlink(missing_ok=True)


@dataclass
class PendingStatus:
    """What a pod that does not become ready shows: a container waiting, an event."""

    reason: str = "ImagePullBackOff"
    message: str = 'Back-off pulling image "ghcr.io/barre/zerofs:2.3.0"'
    event_reason: str = "Failed"
    event_message: str = 'Failed to pull image "ghcr.io/barre/zerofs:2.3.0": not found'


@dataclass
class KubeletStandIn:
    api: client.ApiClient
    namespace: str
    node: str
    runtime: Runtime
    workdir: Path
    journal: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    become_ready: bool = True
    pending: PendingStatus | None = None
    finish_deletions: bool = True
    # How long a stopping server takes before the kubelet confirms the deletion.
    stop_delay: float = 0.0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._core = client.CoreV1Api(self.api)
        self._started: dict[str, Obj] = {}
        self._handled_deletions: set[str] = set()
        self._stopping = threading.Event()
        self._finishers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name=f"kubelet-{self.node}", daemon=True)

    def start(self) -> KubeletStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)
        for finisher in self._finishers:
            finisher.join(timeout=15)
        for pod in list(self._started.values()):
            self.runtime.stop(pod)
        self._started.clear()

    def actions(self, action: str) -> list[tuple[float, str, str, str, str]]:
        return [entry for entry in self.journal if entry[2] == action]

    def _note(self, action: str, pod: Obj) -> None:
        meta = pod["metadata"]
        self.journal.append((time.monotonic(), self.node, action, meta["name"], meta["uid"]))

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        selector = f"spec.nodeName={self.node}"
        while not self._stopping.is_set():
            try:
                listing = call_json(
                    self._core.list_namespaced_pod, self.namespace, field_selector=selector
                )
                for pod in listing.get("items", []):
                    self._handle(pod)
                stream = watch.Watch()
                for event in stream.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    field_selector=selector,
                    resource_version=listing["metadata"]["resourceVersion"],
                    timeout_seconds=1,
                    _request_timeout=(5, 10),
                ):
                    if self._stopping.is_set():
                        stream.stop()
                        break
                    if event["type"] != "DELETED":
                        self._handle(event["raw_object"])
            except (client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                if not self._stopping.is_set():
                    self.errors.append(f"watch: {exc}")
                    time.sleep(0.2)

    def _handle(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp"):
            if uid in self._handled_deletions:
                return
            self._handled_deletions.add(uid)
            if not self.finish_deletions:
                self._note("ignored_deletion", pod)
                return
            finisher = threading.Thread(target=self._finish_deletion, args=(pod,), daemon=True)
            self._finishers.append(finisher)
            finisher.start()
            return
        if uid in self._started or uid in self._handled_deletions:
            return
        self._started[uid] = pod
        try:
            mounted = self._mount(pod)
            self.runtime.start(pod, mounted)
        except Exception as exc:
            self.errors.append(f"start {pod['metadata']['name']}: {exc}")
            self._note("start_failed", pod)
            return
        self._note("started", pod)
        if self.pending is not None:
            self._report_pending(pod, self.pending)
        if self.become_ready:
            deadline = time.monotonic() + 60
            while not self.runtime.ready(pod):
                if time.monotonic() > deadline or self._stopping.is_set():
                    self._note("never_ready", pod)
                    return
                time.sleep(0.1)
            # Noted first: whoever sees the Ready status must find it in the journal.
            self._note("ready", pod)
            self._write_status(pod, ready=True)

    def _finish_deletion(self, pod: Obj) -> None:
        time.sleep(self.stop_delay)
        if pod["metadata"]["uid"] in self._started:
            self.runtime.stop(self._started.pop(pod["metadata"]["uid"]))
        try:
            call_json(
                self._core.delete_namespaced_pod,
                pod["metadata"]["name"],
                self.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod["metadata"]["uid"]}},
                grace_period_seconds=0,
            )
        except client.ApiException as exc:
            if not (is_status(exc, 404) or is_status(exc, 409)):
                self.errors.append(f"final delete: {exc}")
                return
        self._note("deleted", pod)

    # ------------------------------------------------------------ kubelet duties

    def _secret(self, name: str) -> dict[str, str]:
        secret = call_json(self._core.read_namespaced_secret, name, self.namespace)
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def _mount(self, pod: Obj) -> MountedPod:
        directory = self.workdir / pod["metadata"]["uid"]
        directory.mkdir(parents=True, exist_ok=True)
        spec = pod["spec"]
        container = spec["containers"][0]
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        files: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]].get("secret")
            if source is None:
                continue
            data = self._secret(source["secretName"])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                host_path = directory / mount["name"] / item["path"]
                host_path.parent.mkdir(parents=True, exist_ok=True)
                host_path.write_text(data[item["key"]])
                files[f"{mount['mountPath']}/{item['path']}"] = host_path
        env = {}
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            else:
                reference = variable["valueFrom"]["secretKeyRef"]
                env[variable["name"]] = self._secret(reference["name"])[reference["key"]]
        return MountedPod(directory, files, env)

    def _write_status(self, pod: Obj, *, ready: bool, waiting: PendingStatus | None = None) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        truth = "True" if ready else "False"
        state: Obj = {"running": {"startedAt": now}}
        if waiting is not None:
            state = {"waiting": {"reason": waiting.reason, "message": waiting.message}}
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": truth, "lastTransitionTime": now},
            {"type": "Ready", "status": truth, "lastTransitionTime": now},
        ]
        if not ready:
            for condition in conditions[2:]:
                condition["reason"] = "ContainersNotReady"
                condition["message"] = f"containers with unready status: [{container['name']}]"
        for _ in range(10):
            current = call_json(self._core.read_namespaced_pod, name, self.namespace)
            if current["metadata"]["uid"] != pod["metadata"]["uid"]:
                return
            current["status"] = {
                "phase": "Running" if waiting is None else "Pending",
                "conditions": conditions,
                "hostIP": "192.0.2.10",
                "startTime": now,
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": ready,
                        "restartCount": 0,
                        "started": waiting is None,
                        "state": state,
                    }
                ],
            }
            try:
                call_json(self._core.replace_namespaced_pod_status, name, self.namespace, current)
                return
            except client.ApiException as exc:
                if not is_status(exc, 409):
                    self.errors.append(f"status of {name}: {exc}")
                    return

    def _report_pending(self, pod: Obj, pending: PendingStatus) -> None:
        self._write_status(pod, ready=False, waiting=pending)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = pod["metadata"]
        event = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": self.namespace,
                "uid": meta["uid"],
            },
            "reason": pending.event_reason,
            "message": pending.event_message,
            "type": "Warning",
            "count": 3,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "kubelet", "host": self.node},
        }
        call_json(self._core.create_namespaced_event, self.namespace, event)
