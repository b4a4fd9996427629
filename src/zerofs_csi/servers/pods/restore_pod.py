"""Manifests of a restore: the pod that fills a new volume from a checkpoint on the
Kubernetes backend, and the Secret of its two servers' configs.

Pod ``zerofs-restore-<new volume>``, ``restartPolicy: Never``, on any node (it attaches
nothing: the copy goes between two servers' unix sockets):

- ``source``: a native sidecar (an init container with ``restartPolicy: Always``)
  running ZeroFS on the source volume's storage with ``--checkpoint NAME``, read-only,
  which ZeroFS allows beside the volume's own writer;
- ``target``: a native sidecar running ZeroFS on the new volume's storage, its only
  writer (the volume is not created yet);
- ``copy``: the plugin image running ``servers.pods.restore_copy``, which waits for both,
  copies, flushes the target and exits; kubelet then stops the sidecars (SIGTERM: ZeroFS
  flushes again and exits) and the pod ends Succeeded or Failed with the copy's
  ``CODE: message`` as its termination message.

Each server's sockets are in an emptyDir of its own, mounted in the copy container too,
laid out as a volume's socket directory. The configs hold ``${VAR}`` placeholders only
(``zerofs_config``); the Secret carries ``source.toml`` and ``target.toml`` and the
values under ``source.VAR`` and ``target.VAR``, handed to each server's container with
``secretKeyRef``: nothing secret is in the pod spec. The Secret is owned by the pod, so
it goes with it. The security context, cache limits, ``file://`` storage and resources
are those of a volume's server pod (``objects``); the Envoy sidecar is not used here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from zerofs_csi import DRIVER_NAME
from zerofs_csi.servers.base import ADMIN_SOCKET
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.pods.objects import Manifest
from zerofs_csi.servers.zerofs_config import RenderedConfig, render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

POD_NAME_PREFIX = "zerofs-restore-"
COMPONENT = "volume-restore"
RESTORE_SELECTOR = (
    f"{objects.LABEL_MANAGED_BY}={objects.MANAGED_BY},{objects.LABEL_COMPONENT}={COMPONENT}"
)
ANNOTATION_RESTORE_HASH = f"{DRIVER_NAME}/restore-hash"
COPY_CONTAINER = "copy"
SOCKETS_ROOT = PurePosixPath("/run/zerofs-restore")
CACHE_ROOT = PurePosixPath("/var/cache/zerofs")
# The copy's own limit (export_copy.COPY_TIMEOUT_S) plus the servers' start and stop.
ACTIVE_DEADLINE_SECONDS = 6 * 3600 + 1800


def pod_name(volume_id: str) -> str:
    return POD_NAME_PREFIX + volume_id


def secret_name(volume_id: str) -> str:
    return POD_NAME_PREFIX + volume_id


@dataclass(frozen=True)
class Restore:
    """What a restore copies: ``checkpoint`` of ``source_id`` into new volume
    ``volume_id`` of ``capacity_bytes``, both servers run with ``secrets``."""

    volume_id: str
    settings: VolumeSettings
    capacity_bytes: int
    source_id: str
    source_settings: VolumeSettings
    checkpoint: str
    secrets: VolumeSecrets


@dataclass(frozen=True)
class _Server:
    role: str  # "source" or "target": its container, config and socket directory
    volume_id: str
    settings: VolumeSettings
    rendered: RenderedConfig
    run_args: tuple[str, ...]

    @property
    def sockets(self) -> PurePosixPath:
        return SOCKETS_ROOT / self.role


def _server(
    role: str, volume_id: str, settings: VolumeSettings, secrets: VolumeSecrets, *run_args: str
) -> _Server:
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
    return _Server(role, volume_id, settings, rendered, run_args)


def _servers(restore: Restore) -> tuple[_Server, _Server]:
    source = _server(
        "source",
        restore.source_id,
        restore.source_settings,
        restore.secrets,
        "--checkpoint",
        restore.checkpoint,
    )
    return source, _server("target", restore.volume_id, restore.settings, restore.secrets)


def restore_labels(volume_id: str) -> dict[str, str]:
    return {
        objects.LABEL_MANAGED_BY: objects.MANAGED_BY,
        objects.LABEL_COMPONENT: COMPONENT,
        objects.LABEL_VOLUME: volume_id,
    }


def restore_secret(restore: Restore, namespace: str, owner_pod: Mapping[str, str]) -> Manifest:
    """The servers' configs and secret values; ``owner_pod`` is the restore pod's name
    and uid."""
    values: dict[str, str] = {}
    for server in _servers(restore):
        values[f"{server.role}.toml"] = server.rendered.toml_text
        values.update({f"{server.role}.{k}": v for k, v in server.rendered.secret_env.items()})
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(restore.volume_id),
            "namespace": namespace,
            "labels": restore_labels(restore.volume_id),
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


def _server_container(server: _Server, secret: str) -> Manifest:
    env: list[Manifest] = [{"name": "RUST_LOG", "value": server.settings.rust_log}]
    env += [
        {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": f"{server.role}.{name}"}},
        }
        for name in sorted(server.rendered.secret_env)
    ]
    container: Manifest = {
        "name": server.role,
        "image": server.settings.image,
        "imagePullPolicy": "IfNotPresent",
        # A native sidecar: it runs until the copy container has ended.
        "restartPolicy": "Always",
        "command": ["zerofs"],
        "args": ["run", "--config", f"{objects.CONFIG_DIR}/{server.role}.toml", *server.run_args],
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": objects.CONFIG_DIR, "readOnly": True},
            {"name": f"{server.role}-sockets", "mountPath": str(server.sockets)},
            {"name": f"{server.role}-cache", "mountPath": str(CACHE_ROOT / server.role)},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": objects.security_context(),
    }
    resources = server.settings.resources()
    if resources:
        container["resources"] = resources
    return container


def restore_pod(restore: Restore, namespace: str, copy_image: str) -> Manifest:
    """Pod ``zerofs-restore-<volume>``; its annotation ``restore-hash`` tells what it
    restores (the configs and the copy's arguments, no secret value)."""
    servers = _servers(restore)
    source, target = servers
    secret = secret_name(restore.volume_id)
    volumes: list[Manifest] = [
        {
            "name": "config",
            "secret": {
                "secretName": secret,
                "items": [{"key": f"{s.role}.toml", "path": f"{s.role}.toml"} for s in servers],
                "defaultMode": 0o440,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    for server in servers:
        volumes += [
            {"name": f"{server.role}-sockets", "emptyDir": {"sizeLimit": "1Mi"}},
            {
                "name": f"{server.role}-cache",
                "emptyDir": {"sizeLimit": objects.cache_size_limit(server.settings)},
            },
        ]
    init_containers = [_server_container(server, secret) for server in servers]
    storage_dirs = sorted(
        {
            "/" + s.settings.storage_url.path
            for s in servers
            if s.settings.storage_url.scheme == "file"
        }
    )
    for index, storage_dir in enumerate(storage_dirs):
        volumes.append(
            {"name": f"storage-{index}", "hostPath": {"path": storage_dir, "type": "Directory"}}
        )
        for container in init_containers:
            container["volumeMounts"].append({"name": f"storage-{index}", "mountPath": storage_dir})
    copy: Manifest = {
        "name": COPY_CONTAINER,
        "image": copy_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "zerofs_csi.servers.pods.restore_copy"],
        "args": [
            "--source",
            str(source.sockets),
            "--source-export",
            source.volume_id,
            "--target",
            str(target.sockets),
            "--target-export",
            target.volume_id,
            "--capacity-bytes",
            str(restore.capacity_bytes),
        ],  # fmt: skip
        "volumeMounts": [
            {"name": f"{s.role}-sockets", "mountPath": str(s.sockets)} for s in servers
        ],
        "securityContext": objects.security_context(),
    }
    pod: Manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(restore.volume_id),
            "namespace": namespace,
            "labels": restore_labels(restore.volume_id),
            "annotations": {},
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": ACTIVE_DEADLINE_SECONDS,
            "terminationGracePeriodSeconds": objects.TERMINATION_GRACE_SECONDS,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"fsGroup": objects.ZEROFS_UID},
            "initContainers": init_containers,
            "containers": [copy],
            "volumes": volumes,
        },
    }
    configs = "\0".join(s.rendered.toml_text for s in servers)
    pod["metadata"]["annotations"][ANNOTATION_RESTORE_HASH] = objects.config_hash(pod, configs)
    return pod
