"""Volume records in the Kubernetes API, and the ConfigMap reader of ``configMapName``.

``KubernetesVolumeStore`` keeps one ConfigMap per volume, ``zerofs-meta-<volume id>``,
in the driver's namespace, labelled as managed by zerofs-csi, with the record's JSON
under ``data["volume.json"]``. The ConfigMap's resourceVersion is the compare-and-swap
token: updates carry it (the API server answers 409 Conflict when the object changed)
and deletes carry it as a precondition. The records therefore survive controller
restarts, and several controller replicas see one state.

API access the controller needs in its namespace: configmaps get, list, create,
update, delete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.store import VolumeRecord
from zerofs_csi.kube.api import Obj, api_failure, call_json, is_status, listed
from zerofs_csi.servers.pods.objects import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_VOLUME,
    MANAGED_BY,
)
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.settings import CONFIG_MAP_PARAMETER

NAME_PREFIX = "zerofs-meta-"
RECORD_KEY = "volume.json"
COMPONENT = "volume-metadata"
SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT}"


def config_map_name(volume_id: str) -> str:
    return NAME_PREFIX + validate_volume_id(volume_id)


def _meta(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


class KubernetesVolumeStore:
    """A ``VolumeStore`` of ConfigMaps in ``namespace``.

    ``core`` replaces the CoreV1Api built from ``api`` (to instrument calls in tests).
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        *,
        core: client.CoreV1Api | None = None,
    ) -> None:
        self._core = core if core is not None else client.CoreV1Api(api)
        self._namespace = namespace

    def _where(self, volume_id: str) -> str:
        return f"ConfigMap {self._namespace}/{config_map_name(volume_id)}"

    def _manifest(self, record: VolumeRecord) -> Obj:
        metadata: Obj = {
            "name": config_map_name(record.volume_id),
            "namespace": self._namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_COMPONENT: COMPONENT,
                LABEL_VOLUME: record.volume_id,
            },
        }
        if record.version:
            metadata["resourceVersion"] = record.version
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": {RECORD_KEY: record.to_json()},
        }

    def _record(self, obj: Obj, where: str) -> VolumeRecord:
        data = obj.get("data")
        text = data.get(RECORD_KEY) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise errors.Internal(f"volume record {where} has no {RECORD_KEY!r} key")
        version = str(_meta(obj).get("resourceVersion") or "")
        if not version:
            raise errors.Internal(f"volume record {where} came back without a resourceVersion")
        record = VolumeRecord.from_json(text, version, where)
        if config_map_name(record.volume_id) != _meta(obj).get("name"):
            raise errors.Internal(f"volume record {where} holds volume {record.volume_id!r}")
        return record

    def get(self, volume_id: str) -> VolumeRecord | None:
        where = self._where(volume_id)
        try:
            obj = call_json(
                self._core.read_namespaced_config_map, config_map_name(volume_id), self._namespace
            )
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise api_failure(exc, f"reading {where}") from None
        return self._record(obj, where)

    def create(self, record: VolumeRecord) -> VolumeRecord:
        where = self._where(record.volume_id)
        try:
            obj = call_json(
                self._core.create_namespaced_config_map,
                self._namespace,
                self._manifest(record.replace(version="")),
            )
        except Exception as exc:
            if is_status(exc, 409):
                raise errors.Aborted(
                    f"volume {record.volume_id} was created concurrently ({where} exists); "
                    "retry to get it"
                ) from None
            raise api_failure(exc, f"creating {where}") from None
        return self._record(obj, where)

    def update(self, record: VolumeRecord) -> VolumeRecord:
        where = self._where(record.volume_id)
        if not record.version:
            raise errors.Internal(f"update of {where} without the version it was read at")
        try:
            obj = call_json(
                self._core.replace_namespaced_config_map,
                config_map_name(record.volume_id),
                self._namespace,
                self._manifest(record),
            )
        except Exception as exc:
            if is_status(exc, 409):
                raise errors.Aborted(
                    f"volume {record.volume_id} was changed concurrently ({where}); retry"
                ) from None
            if is_status(exc, 404):
                raise errors.Aborted(
                    f"volume {record.volume_id} was deleted concurrently ({where}); retry"
                ) from None
            raise api_failure(exc, f"updating {where}") from None
        return self._record(obj, where)

    def delete(self, record: VolumeRecord) -> None:
        where = self._where(record.volume_id)
        if not record.version:
            raise errors.Internal(f"delete of {where} without the version it was read at")
        options = {"preconditions": {"resourceVersion": record.version}}
        try:
            call_json(
                self._core.delete_namespaced_config_map,
                config_map_name(record.volume_id),
                self._namespace,
                body=options,
            )
        except Exception as exc:
            if is_status(exc, 404):
                return
            if is_status(exc, 409):
                raise errors.Aborted(
                    f"volume {record.volume_id} was changed concurrently ({where}); retry"
                ) from None
            raise api_failure(exc, f"deleting {where}") from None

    def list(self) -> list[VolumeRecord]:
        records = [
            self._record(obj, f"ConfigMap {self._namespace}/{_meta(obj).get('name', '')}")
            for obj in listed(
                self._core.list_namespaced_config_map,
                self._namespace,
                label_selector=SELECTOR,
                what=f"volume records in namespace {self._namespace}",
            )
        ]
        return sorted(records, key=lambda r: r.volume_id)


class KubernetesConfigMapReader:
    """Reads the ConfigMap that a StorageClass's ``configMapName`` names, in ``namespace``.

    Called with the ConfigMap's name; returns its ``data``. A missing ConfigMap is
    INVALID_ARGUMENT naming it, since the StorageClass refers to something absent.
    API access: configmaps get in the driver's namespace.
    """

    def __init__(
        self, api: client.ApiClient, namespace: str, *, core: client.CoreV1Api | None = None
    ) -> None:
        self._core = core if core is not None else client.CoreV1Api(api)
        self._namespace = namespace

    def __call__(self, name: str) -> Mapping[str, str]:
        where = f"ConfigMap {self._namespace}/{name}"
        try:
            obj = call_json(self._core.read_namespaced_config_map, name, self._namespace)
        except Exception as exc:
            if is_status(exc, 404):
                raise errors.InvalidArgument(
                    f"{where}, named by the StorageClass parameter {CONFIG_MAP_PARAMETER!r}, "
                    "does not exist"
                ) from None
            raise api_failure(exc, f"reading {where}") from None
        data = obj.get("data") or {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise errors.InvalidArgument(f"{where} has no usable string data")
        return {str(k): v for k, v in data.items()}
