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

A volume staged nowhere has no running server: with job pods (the controller given the
image of their job container, ``--job-image``), a checkpoint pod
(``job_pods.checkpoint_job``) runs a server of the volume for the checkpoint, followed
across the snapshotter's retries (``job_pods_kube``); ControllerPublishVolume waits
(UNAVAILABLE) while it runs, so the volume never has two writers. The server needs the
volume's secrets: the VolumeSnapshotClass's snapshotter secret. Without job pods such a
volume is FAILED_PRECONDITION: it must be staged (in use by a pod).

A clone of a volume staged nowhere needs no checkpoint (``copies_idle_sources``): its
restore pod runs the source's own server, its only writer, and copies the volume as it
is. Job pods running a volume's writable server carry its ``serves-volume`` label: while
one runs, the volume is not published, and no other such pod of it starts. A clone that
began from a checkpoint while its source was staged, and whose source was unstaged
since, deletes that checkpoint before it copies the volume itself.

Restores (CreateVolume from a snapshot or a volume) run in restore pods
(``restores_kube``), with job pods too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.checkpoints import (
    CLONE_CHECKPOINT_PREFIX,
    CheckpointSource,
    CopyProgress,
    JobInProgress,
    no_progress,
    volume_secrets,
)
from zerofs_csi.controller.job_pods_kube import KubeJobs
from zerofs_csi.controller.restores_kube import KubeRestores
from zerofs_csi.controller.store import VolumeStore
from zerofs_csi.kube import checkpoint_requests as requests
from zerofs_csi.kube.api import Obj, api_failure, call_json, is_status
from zerofs_csi.servers.admin import CheckpointInfo
from zerofs_csi.servers.pods import job_pods
from zerofs_csi.volume.settings import parse_volume_settings

log = logging.getLogger(__name__)


def _checkpoint_of_job(text: str) -> CheckpointInfo:
    """The checkpoint a checkpoint pod's job reported (``checkpoint_job``)."""
    try:
        body = json.loads(text)
        return CheckpointInfo(
            id=str(body["id"]),
            name=str(body["name"]),
            created_at=datetime.fromtimestamp(int(body["createdAt"]), UTC),
        )
    except (ValueError, KeyError, TypeError):
        raise errors.Internal(
            f"a checkpoint pod succeeded without the checkpoint's id and time: {text[:200]!r}"
        ) from None


# How long one call waits for the node plugin before answering UNAVAILABLE.
DEFAULT_WAIT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.2


class KubeCheckpoints:
    """``VolumeCheckpoints`` through CheckpointRequests in ``namespace``; the volume's
    node is read from ``volumes``. ``custom`` replaces the CustomObjectsApi built from
    ``api`` (to instrument calls in tests). ``jobs`` runs the checkpoint pods of volumes
    staged nowhere and the restore pods; without it neither is done. ``copy_progress``
    is told how far restores got."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        volumes: VolumeStore,
        *,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
        custom: client.CustomObjectsApi | None = None,
        jobs: KubeJobs | None = None,
        copy_progress: CopyProgress = no_progress,
    ) -> None:
        self._jobs = jobs
        self._restorer = KubeRestores(jobs, copy_progress) if jobs is not None else None
        self.restores = self.copies_idle_sources = jobs is not None
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
        node = self._node_of(volume_id)
        if node is None:
            return _checkpoint_of_job(
                self._by_job("create", volume_id, parameters, name, csi_secrets)
            )
        status = self._outcome(requests.CREATE, volume_id, name, node)
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
        node = self._node_of(volume_id)
        if node is None:
            self._by_job("delete", volume_id, parameters, name, csi_secrets)
            return
        # A create request of the same checkpoint left uncollected would otherwise answer
        # a later CreateSnapshot of that name with the checkpoint deleted here.
        left = self._read(requests.request_name(requests.CREATE, volume_id, name))
        if left is not None:
            self._delete(left)
        self._outcome(requests.DELETE, volume_id, name, node)

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
                "volume (it runs without --job-image)"
            )
        if source.checkpoint is None:
            self._retire_clone_checkpoint(source, volume_id, csi_secrets)
            self._check_no_other_server(source.volume_id, job_pods.restore_pod_name(volume_id))
        self._restorer.fill(source, volume_id, parameters, capacity_bytes, csi_secrets)

    def check_publishable(self, volume_id: str) -> None:
        if self._jobs is None:
            return
        for name in self._servers_of(volume_id):
            raise errors.Unavailable(
                f"a server of volume {volume_id} runs in job pod {self._namespace}/{name}: "
                "the volume is published once it ended (retry)"
            )

    def _servers_of(self, volume_id: str) -> list[str]:
        """The running job pods with a writable server of the volume."""
        assert self._jobs is not None
        return self._jobs.running(f"{job_pods.LABEL_SERVES_VOLUME}={volume_id}")

    def _check_no_other_server(self, volume_id: str, own_pod: str) -> None:
        """JobInProgress while a job pod other than ``own_pod`` runs a server of the
        volume: a second one would fence it."""
        for name in self._servers_of(volume_id):
            if name != own_pod:
                raise JobInProgress(
                    f"job pod {self._namespace}/{name} runs a server of volume {volume_id}: "
                    "retry once it ended"
                )

    def _retire_clone_checkpoint(
        self, source: CheckpointSource, volume_id: str, csi_secrets: Mapping[str, str]
    ) -> None:
        """When the new volume's restore pod reads the checkpoint taken for the clone
        while its source was staged: delete that checkpoint (a checkpoint pod, followed
        across retries while the restore pod stays as the mark of it), then the pod."""
        assert self._jobs is not None
        name = job_pods.restore_pod_name(volume_id)
        pod = self._jobs.read(name)
        checkpoint = CLONE_CHECKPOINT_PREFIX + volume_id
        if pod is None or job_pods.checkpoint_read(pod) != (source.volume_id, checkpoint):
            return
        log.info(
            "the clone's source was unstaged: its checkpoint goes, the volume is copied as is",
            extra={"volume_id": volume_id, "source": source.volume_id},
        )
        self._by_job("delete", source.volume_id, source.parameters, checkpoint, csi_secrets)
        self._jobs.remove(name)

    def remove_jobs(self, volume_id: str) -> None:
        """Delete the volume's job pods (a restore or a checkpoint left behind)."""
        if self._jobs is not None:
            for name in (
                job_pods.restore_pod_name(volume_id),
                job_pods.checkpoint_pod_name(volume_id),
            ):
                self._jobs.remove(name)

    def sweep_idle_jobs(self, idle_seconds: float) -> list[str]:
        """Remove the job pods no call has stepped for ``idle_seconds``: their claim or
        snapshot was deleted while they ran. A clone's restore pod goes once the
        checkpoint taken for it is deleted too, through its source's node (a later sweep
        goes on while that runs); with a source staged nowhere, the checkpoint stays with
        the source's data, and a warning says so. Returns the pods removed."""
        if self._jobs is None:
            return []
        removed = []
        for pod in self._jobs.idle(idle_seconds):
            name = str(pod["metadata"]["name"])
            read = job_pods.checkpoint_read(pod)
            if read is not None and read[1].startswith(CLONE_CHECKPOINT_PREFIX):
                try:
                    self._delete_clone_checkpoint(*read)
                except JobInProgress:
                    continue
            log.warning("removing a job pod no call has stepped", extra={"pod": name})
            self._jobs.remove(name)
            removed.append(name)
        return removed

    def _delete_clone_checkpoint(self, volume_id: str, name: str) -> None:
        record = self._volumes.get(volume_id)
        if record is None:
            return  # its data went with the volume
        try:
            if record.published_node:
                self.delete(volume_id, record.parameters, True, name, {})
                return
            why = "the volume is staged nowhere, and starting its server needs its secrets"
        except JobInProgress:
            raise
        except errors.CsiError as exc:
            why = exc.message
        log.warning(
            "a clone's checkpoint %r of volume %s is left: %s; it goes with the volume's data",
            name,
            volume_id,
            why,
            extra={"volume_id": volume_id},
        )

    def _node_of(self, volume_id: str) -> str | None:
        """The node where the volume is staged; None when it is staged nowhere and job
        pods take its checkpoints."""
        record = self._volumes.get(volume_id)
        if record is None:
            raise errors.NotFound(f"volume {volume_id} does not exist")
        if record.published_node:
            return record.published_node
        if self._jobs is None:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is staged on no node: on the Kubernetes backend the node "
                "plugin where a volume is staged takes and deletes its checkpoints, so the "
                "volume must be in use by a pod to be snapshotted or to have a snapshot deleted"
            )
        return None

    def _by_job(
        self,
        operation: str,
        volume_id: str,
        parameters: Mapping[str, str],
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> str:
        """``operation`` of checkpoint ``name`` by a checkpoint pod (one step of it); the
        job's report once it succeeded."""
        assert self._jobs is not None
        self._check_no_other_server(volume_id, job_pods.checkpoint_pod_name(volume_id))
        job = job_pods.checkpoint_job(
            volume_id,
            parse_volume_settings(parameters),
            volume_secrets(volume_id, csi_secrets),
            operation,
            name,
        )
        what = f"checkpoint {name!r} ({operation}) of volume {volume_id}, staged nowhere"
        return self._jobs.run(job, what)

    def _outcome(self, operation: str, volume_id: str, checkpoint: str, node: str) -> Obj:
        """The status of the node plugin's work on the request, once it is done."""
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
