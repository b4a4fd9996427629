"""Snapshot records in the Kubernetes API: one ConfigMap per snapshot,
``zerofs-snap-<key>``, in the driver's namespace, beside the volume records
(``store_kube``), labelled as managed by zerofs-csi with the source volume, the record's
JSON under ``data["snapshot.json"]``. They survive controller restarts, and several
controller replicas see one state. API access: configmaps get, list, create, delete.
"""

from __future__ import annotations

import json

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.snapshot_store import SnapshotRecord
from zerofs_csi.kube.api import Obj, api_failure, call_json, is_status, listed
from zerofs_csi.servers.pods.objects import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_VOLUME,
    MANAGED_BY,
)
from zerofs_csi.volume.id import validate_volume_id

NAME_PREFIX = "zerofs-snap-"
RECORD_KEY = "snapshot.json"
COMPONENT = "snapshot-metadata"
SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT}"


def config_map_name(key: str) -> str:
    # Keys are made as volume ids are (volume_id_for_name), and checked the same way.
    return NAME_PREFIX + validate_volume_id(key)


class KubernetesSnapshotStore:
    """A ``SnapshotStore`` of ConfigMaps in ``namespace``."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace

    def _where(self, key: str) -> str:
        return f"ConfigMap {self._namespace}/{config_map_name(key)}"

    def _record(self, obj: Obj, where: str) -> SnapshotRecord:
        data = obj.get("data")
        text = data.get(RECORD_KEY) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise errors.Internal(f"snapshot record {where} has no {RECORD_KEY!r} key")
        try:
            body = json.loads(text)
        except ValueError:
            raise errors.Internal(f"snapshot record {where} is not valid JSON") from None
        return SnapshotRecord.from_dict(body, where)

    def get(self, key: str) -> SnapshotRecord | None:
        where = self._where(key)
        try:
            obj = call_json(
                self._core.read_namespaced_config_map, config_map_name(key), self._namespace
            )
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise api_failure(exc, f"reading {where}") from None
        return self._record(obj, where)

    def create(self, record: SnapshotRecord) -> None:
        where = self._where(record.key)
        manifest = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": config_map_name(record.key),
                "namespace": self._namespace,
                "labels": {
                    LABEL_MANAGED_BY: MANAGED_BY,
                    LABEL_COMPONENT: COMPONENT,
                    LABEL_VOLUME: record.source_volume_id,
                },
            },
            "data": {RECORD_KEY: json.dumps(record.to_dict(), sort_keys=True)},
        }
        try:
            call_json(self._core.create_namespaced_config_map, self._namespace, manifest)
        except Exception as exc:
            if is_status(exc, 409):
                raise errors.Aborted(
                    f"snapshot {record.name!r} was created concurrently ({where}); retry"
                ) from None
            raise api_failure(exc, f"creating {where}") from None

    def delete(self, key: str) -> None:
        where = self._where(key)
        try:
            call_json(
                self._core.delete_namespaced_config_map, config_map_name(key), self._namespace
            )
        except Exception as exc:
            if is_status(exc, 404):
                return
            raise api_failure(exc, f"deleting {where}") from None

    def list(self) -> list[SnapshotRecord]:
        records = [
            self._record(
                obj, f"ConfigMap {self._namespace}/{(obj.get('metadata') or {}).get('name', '')}"
            )
            for obj in listed(
                self._core.list_namespaced_config_map,
                self._namespace,
                label_selector=SELECTOR,
                what=f"snapshot records in namespace {self._namespace}",
            )
        ]
        return sorted(records, key=lambda r: r.key)
