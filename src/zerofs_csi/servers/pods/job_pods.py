"""Manifests of job pods: short-lived pods that run ZeroFS servers of volumes for one job
of the controller's on the Kubernetes backend, and the Secret of their configs.

Two jobs:

- a restore (``restore_pod``), ``zerofs-restore-<new volume>``: the checkpoint's server
  (``source``: ``run --checkpoint NAME``, read-only, which ZeroFS allows beside the
  volume's own writer) and the new volume's (``target``, its only writer: the volume is
  not created yet), and the ``copy`` container running ``servers.pods.restore_copy``;
- a checkpoint of a volume staged nowhere (``checkpoint_pod``),
  ``zerofs-checkpoint-<volume>``: the volume's server (``server``, its only writer while
  the controller keeps the volume from being published) and the ``checkpoint``
  container running ``servers.pods.checkpoint_job``.

Each pod has ``restartPolicy: Never`` and runs on any node (it attaches nothing: the job
talks to the servers' unix sockets). The servers are native sidecars (init containers
with ``restartPolicy: Always``); once the job container has exited kubelet stops them
(SIGTERM: ZeroFS flushes and exits) and the pod ends Succeeded or Failed, the job's
termination message saying how (``CODE: message`` on a failure, errors.of_code).

Each server's sockets are in an emptyDir of its own, mounted in the job container too,
laid out as a volume's socket directory. The configs hold ``${VAR}`` placeholders only
(``zerofs_config``); the Secret carries ``<server>.toml`` and the values under
``<server>.VAR``, handed to each server's container with ``secretKeyRef``: nothing secret
is in the pod spec. The Secret is owned by the pod, so it goes with it. The security
context, cache limits, ``file://`` storage and resources are those of a volume's server
pod (``objects``); the Envoy sidecar is not used here. The pod's ``job-hash`` annotation
says what it does (the configs and the job's arguments, no secret value), a restore's
``reads-checkpoint`` which checkpoint it reads, and ``last-step`` when a call last
stepped it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from zerofs_csi import DRIVER_NAME
from zerofs_csi.servers.base import ADMIN_SOCKET
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.pods.objects import Manifest
from zerofs_csi.servers.zerofs_config import RenderedConfig, render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

RESTORE_PREFIX = "zerofs-restore-"
CHECKPOINT_PREFIX = "zerofs-checkpoint-"
COMPONENT = "volume-job"
ANNOTATION_JOB_HASH = f"{DRIVER_NAME}/job-hash"
# When a CSI call last stepped the job (epoch seconds): a job no call steps any more was
# given up by its caller, and is swept.
ANNOTATION_LAST_STEP = f"{DRIVER_NAME}/last-step"
# The checkpoint a restore reads, as "<volume>/<name>": a clone's is the job's to delete.
ANNOTATION_READS_CHECKPOINT = f"{DRIVER_NAME}/reads-checkpoint"
# On a job pod running a volume's writable server (a checkpoint pod's volume, the
# source staged nowhere of a restore that copies it as it is): which volume.
LABEL_SERVES_VOLUME = f"{DRIVER_NAME}/serves-volume"
# The container whose end is the job's.
JOB_CONTAINER = "job"
SOCKETS_ROOT = PurePosixPath("/run/zerofs-job")
CACHE_ROOT = PurePosixPath("/var/cache/zerofs")
# The copy's own limit (export_copy.COPY_TIMEOUT_S) plus the servers' start and stop.
ACTIVE_DEADLINE_SECONDS = 6 * 3600 + 1800


def restore_pod_name(volume_id: str) -> str:
    return RESTORE_PREFIX + volume_id


def checkpoint_pod_name(volume_id: str) -> str:
    return CHECKPOINT_PREFIX + volume_id


@dataclass(frozen=True)
class Server:
    """A server of a job pod: its container's name (also its config's and sockets'),
    the volume it serves and ``run``'s arguments after the config."""

    role: str
    volume_id: str
    settings: VolumeSettings
    rendered: RenderedConfig
    run_args: tuple[str, ...] = ()

    @property
    def sockets(self) -> PurePosixPath:
        return SOCKETS_ROOT / self.role


def server(
    role: str,
    volume_id: str,
    settings: VolumeSettings,
    secrets: VolumeSecrets,
    run_args: Sequence[str] = (),
) -> Server:
    sockets = SOCKETS_ROOT / role
    rendered = render_zerofs_config(
        settings,
        volume_id,
        secrets,
        cache_dir=str(CACHE_ROOT / role),
        nbd_socket=str(sockets / "nbd.sock"),
        ninep_socket=str(sockets / "9p.sock"),
        rpc_socket=str(sockets / ADMIN_SOCKET),
    )
    return Server(role, volume_id, settings, rendered, tuple(run_args))


@dataclass(frozen=True)
class Job:
    """A job pod to run: its name, the volume it is for (labels), its servers and what
    its job container runs (the plugin image, ``python -m <module> <args>``)."""

    name: str
    volume_id: str
    servers: tuple[Server, ...]
    module: str
    args: tuple[str, ...]
    # The (volume, checkpoint name) a restore reads.
    reads_checkpoint: tuple[str, str] | None = None
    # The existing volume whose writable server the pod runs.
    serves_volume: str | None = None


def job_labels(volume_id: str) -> dict[str, str]:
    return {
        objects.LABEL_MANAGED_BY: objects.MANAGED_BY,
        objects.LABEL_COMPONENT: COMPONENT,
        objects.LABEL_VOLUME: volume_id,
    }


def job_secret(job: Job, namespace: str, owner_pod: Mapping[str, str]) -> Manifest:
    """The servers' configs and secret values; ``owner_pod`` is the job pod's name and
    uid."""
    values: dict[str, str] = {}
    for each in job.servers:
        values[f"{each.role}.toml"] = each.rendered.toml_text
        values.update({f"{each.role}.{k}": v for k, v in each.rendered.secret_env.items()})
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": job.name,
            "namespace": namespace,
            "labels": job_labels(job.volume_id),
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": owner_pod["name"],
                    "uid": owner_pod["uid"],
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "type": "Opaque",
        "data": objects.encode_data(values),
    }


def _server_container(each: Server, secret: str) -> Manifest:
    env: list[Manifest] = [{"name": "RUST_LOG", "value": each.settings.rust_log}]
    env += [
        {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": f"{each.role}.{name}"}},
        }
        for name in sorted(each.rendered.secret_env)
    ]
    container: Manifest = {
        "name": each.role,
        "image": each.settings.image,
        "imagePullPolicy": "IfNotPresent",
        # A native sidecar: it runs until the job container has ended.
        "restartPolicy": "Always",
        "command": ["zerofs"],
        "args": ["run", "--config", f"{objects.CONFIG_DIR}/{each.role}.toml", *each.run_args],
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": objects.CONFIG_DIR, "readOnly": True},
            {"name": f"{each.role}-sockets", "mountPath": str(each.sockets)},
            {"name": f"{each.role}-cache", "mountPath": str(CACHE_ROOT / each.role)},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": objects.security_context(),
    }
    resources = each.settings.resources()
    if resources:
        container["resources"] = resources
    return container


def job_pod(job: Job, namespace: str, image: str) -> Manifest:
    """The job's pod; its job container runs ``image`` (the plugin's)."""
    volumes: list[Manifest] = [
        {
            "name": "config",
            "secret": {
                "secretName": job.name,
                "items": [{"key": f"{s.role}.toml", "path": f"{s.role}.toml"} for s in job.servers],
                "defaultMode": 0o440,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    for each in job.servers:
        volumes += [
            {"name": f"{each.role}-sockets", "emptyDir": {"sizeLimit": "1Mi"}},
            {
                "name": f"{each.role}-cache",
                "emptyDir": {"sizeLimit": objects.cache_size_limit(each.settings)},
            },
        ]
    sidecars = [_server_container(each, job.name) for each in job.servers]
    storage_dirs = sorted(
        {
            "/" + each.settings.storage_url.path
            for each in job.servers
            if each.settings.storage_url.scheme == "file"
        }
    )
    for index, storage_dir in enumerate(storage_dirs):
        volumes.append(
            {"name": f"storage-{index}", "hostPath": {"path": storage_dir, "type": "Directory"}}
        )
        for container in sidecars:
            container["volumeMounts"].append({"name": f"storage-{index}", "mountPath": storage_dir})
    worker: Manifest = {
        "name": JOB_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", job.module],
        "args": list(job.args),
        # The root filesystem is read-only: nbdcopy's stderr is kept in a file of /tmp.
        "volumeMounts": [
            *({"name": f"{e.role}-sockets", "mountPath": str(e.sockets)} for e in job.servers),
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": objects.security_context(),
        # A job that died before writing its outcome (a crash, an import error) still
        # says why: kubelet puts its log's tail in the termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: Manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": job.name,
            "namespace": namespace,
            "labels": job_labels(job.volume_id),
            "annotations": {},
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
            "terminationGracePeriodSeconds": objects.TERMINATION_GRACE_SECONDS,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"fsGroup": objects.ZEROFS_UID},
            "initContainers": sidecars,
            "containers": [worker],
            "volumes": volumes,
        },
    }
    if job.reads_checkpoint is not None:
        pod["metadata"]["annotations"][ANNOTATION_READS_CHECKPOINT] = "/".join(job.reads_checkpoint)
    if job.serves_volume is not None:
        pod["metadata"]["labels"][LABEL_SERVES_VOLUME] = job.serves_volume
    configs = "\0".join(each.rendered.toml_text for each in job.servers)
    pod["metadata"]["annotations"][ANNOTATION_JOB_HASH] = objects.config_hash(pod, configs)
    return pod


def restore_job(
    volume_id: str,
    settings: VolumeSettings,
    capacity_bytes: int,
    source_id: str,
    source_settings: VolumeSettings,
    checkpoint: str | None,
    secrets: VolumeSecrets,
) -> Job:
    """Checkpoint ``checkpoint`` of ``source_id`` copied into new volume ``volume_id`` of
    ``capacity_bytes``; without a checkpoint, the source volume itself, which its server
    here serves as its only writer. Both servers run with ``secrets``."""
    run_args = ("--checkpoint", checkpoint) if checkpoint is not None else ()
    source = server("source", source_id, source_settings, secrets, run_args)
    target = server("target", volume_id, settings, secrets)
    args = (
        "--source", str(source.sockets), "--source-export", source_id,
        "--target", str(target.sockets), "--target-export", volume_id,
        "--capacity-bytes", str(capacity_bytes),
    )  # fmt: skip
    return Job(
        restore_pod_name(volume_id),
        volume_id,
        (source, target),
        "zerofs_csi.servers.pods.restore_copy",
        args,
        reads_checkpoint=(source_id, checkpoint) if checkpoint is not None else None,
        serves_volume=source_id if checkpoint is None else None,
    )


def checkpoint_read(pod: Manifest) -> tuple[str, str] | None:
    """The (volume, checkpoint name) the restore pod ``pod`` reads; None for another."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    volume, separator, name = str(annotations.get(ANNOTATION_READS_CHECKPOINT, "")).partition("/")
    return (volume, name) if separator and volume and name else None


def checkpoint_job(
    volume_id: str, settings: VolumeSettings, secrets: VolumeSecrets, operation: str, name: str
) -> Job:
    """``operation`` (``create`` or ``delete``) of the volume's checkpoint ``name``."""
    each = server("server", volume_id, settings, secrets)
    args = ("--sockets", str(each.sockets), "--volume", volume_id, f"--{operation}", name)
    return Job(
        checkpoint_pod_name(volume_id),
        volume_id,
        (each,),
        "zerofs_csi.servers.pods.checkpoint_job",
        args,
        serves_volume=volume_id,
    )
