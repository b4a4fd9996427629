"""The controller's volume metadata: one small record per volume, kept where it survives.

``VolumeStore`` is the interface; ``FileVolumeStore`` keeps the records as JSON files in
a directory (for use without Kubernetes, the demo and tests), and
``volume_store_kube.KubernetesVolumeStore`` keeps one ConfigMap per volume. Both
survive controller restarts; the ConfigMaps also serve several controller replicas.

Every write is a compare-and-swap on the record's ``version`` token: a write based on
a record that changed meanwhile fails with ``Aborted``, so the CO retries the call and
the retry sees the current record. Errors carry their gRPC code.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from zerofs_csi import errors
from zerofs_csi.controller.record_files import SUFFIX, RecordFiles

# Bumped when the record's JSON shape changes incompatibly; a record with another
# schema is refused rather than misread.
RECORD_SCHEMA = 1


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class VolumeRecord:
    """What the controller knows about one volume.

    ``parameters`` are the volume's settings as ``VolumeSettings.to_parameters`` gives
    them (any ConfigMap already folded in); ``request_parameters`` are the CreateVolume
    parameters as the CO sent them, kept to recognise a retry of the same request.
    ``volume_context`` is what CreateVolume returned (the CO keeps it unchanged);
    ``capacity_bytes`` is the current size, which expansion grows. ``name`` is the
    CreateVolume name the id was derived from (``volume_id.volume_id_for_name``); a
    record written before names were kept reads its id as its name, which it was.
    ``version`` is the store's compare-and-swap token, empty for a record not yet stored.
    ``source_snapshot_id`` or ``source_volume_id`` names the snapshot or volume the
    volume's data was copied from, if any. A ``read_only_many`` volume
    (MULTI_NODE_READER_ONLY) is published to any number of nodes, ``reader_nodes``,
    never to a writer's ``published_node``.
    """

    volume_id: str
    capacity_bytes: int
    parameters: Mapping[str, str]
    request_parameters: Mapping[str, str]
    volume_context: Mapping[str, str]
    published_node: str | None = None
    name: str = ""
    created_at: str = field(default_factory=utc_now)
    version: str = ""
    source_snapshot_id: str = ""
    source_volume_id: str = ""
    read_only_many: bool = False
    reader_nodes: tuple[str, ...] = ()

    @property
    def published_nodes(self) -> list[str]:
        """Every node the volume is published to."""
        return [self.published_node] if self.published_node else list(self.reader_nodes)

    def replace(self, **changes: Any) -> VolumeRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECORD_SCHEMA,
            "volumeId": self.volume_id,
            "name": self.name,
            "capacityBytes": self.capacity_bytes,
            "parameters": dict(self.parameters),
            "requestParameters": dict(self.request_parameters),
            "volumeContext": dict(self.volume_context),
            "publishedNode": self.published_node,
            "createdAt": self.created_at,
            # Only when set: records of volumes not restored stay as they were written.
            **({"sourceSnapshotId": self.source_snapshot_id} if self.source_snapshot_id else {}),
            **({"sourceVolumeId": self.source_volume_id} if self.source_volume_id else {}),
            **({"readOnlyMany": True} if self.read_only_many else {}),
            **({"readerNodes": list(self.reader_nodes)} if self.reader_nodes else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, version: str, where: str) -> VolumeRecord:
        """Parse a stored record; Internal names ``where`` when it cannot be read."""
        try:
            body = json.loads(text)
        except ValueError:
            raise errors.Internal(f"volume record {where} is not valid JSON") from None
        return cls.from_dict(body, version, where)

    @classmethod
    def from_dict(cls, body: object, version: str, where: str) -> VolumeRecord:
        if not isinstance(body, dict):
            raise errors.Internal(f"volume record {where} is not a JSON object")
        if body.get("schema") != RECORD_SCHEMA:
            raise errors.Internal(
                f"volume record {where} has schema {body.get('schema')!r}, this driver reads "
                f"schema {RECORD_SCHEMA} (written by another driver version?)"
            )
        try:
            volume_id = _typed(body, "volumeId", str)
            return cls(
                volume_id=volume_id,
                name=_typed(body, "name", str) if "name" in body else volume_id,
                capacity_bytes=_typed(body, "capacityBytes", int),
                parameters=_string_map(body, "parameters"),
                request_parameters=_string_map(body, "requestParameters"),
                volume_context=_string_map(body, "volumeContext"),
                published_node=_typed(body, "publishedNode", (str, type(None))),
                created_at=_typed(body, "createdAt", str),
                version=version,
                source_snapshot_id=(
                    _typed(body, "sourceSnapshotId", str) if "sourceSnapshotId" in body else ""
                ),
                source_volume_id=(
                    _typed(body, "sourceVolumeId", str) if "sourceVolumeId" in body else ""
                ),
                read_only_many=_flag(body, "readOnlyMany"),
                reader_nodes=tuple(_string_list(body, "readerNodes")),
            )
        except (KeyError, TypeError) as exc:
            raise errors.Internal(f"volume record {where}: {exc.args[0]}") from None


def _typed(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise KeyError(f"missing {key!r}")
    value = body[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key!r} has the wrong type")
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"{key!r} must be true or false")
    return value


def _string_list(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"{key!r} must be a list of strings")
    return list(value)


def _string_map(body: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _typed(body, key, dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"{key!r} must map strings to strings")
    return dict(value)


class VolumeStore(Protocol):
    """Volume records with compare-and-swap writes.

    ``create`` fails with Aborted when the volume already has a record; ``update`` and
    ``delete`` take the record as read (its ``version``) and fail with Aborted when the
    stored one changed since. ``delete`` of a missing record succeeds. Returned records
    carry their new version.
    """

    def get(self, volume_id: str) -> VolumeRecord | None: ...

    def create(self, record: VolumeRecord) -> VolumeRecord: ...

    def update(self, record: VolumeRecord) -> VolumeRecord: ...

    def delete(self, record: VolumeRecord) -> None: ...

    def list(self) -> list[VolumeRecord]:
        """Every record, sorted by volume id."""
        ...


class FileVolumeStore:
    """Records as ``<directory>/<volume id>.json`` (``record_files.RecordFiles``).

    Writers hold the directory's flock for the read-compare-write, so processes sharing
    the directory (a restarted controller beside a dying one) never interleave.
    The version token is a random id written into the file, so a deleted and re-created
    record never matches a token read before the deletion.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files = RecordFiles(directory, "volume", _parse_volume_file)

    def _write(self, record: VolumeRecord) -> VolumeRecord:
        stored = record.replace(version=uuid.uuid4().hex)
        envelope = {"version": stored.version, "record": stored.to_dict()}
        self._files.write(self._files.path(record.volume_id), envelope)
        return stored

    def get(self, volume_id: str) -> VolumeRecord | None:
        return self._files.read(self._files.path(volume_id))

    def create(self, record: VolumeRecord) -> VolumeRecord:
        with self._files.locked():
            if self.get(record.volume_id) is not None:
                raise errors.Aborted(
                    f"volume {record.volume_id} was created concurrently; retry to get it"
                )
            return self._write(record)

    def update(self, record: VolumeRecord) -> VolumeRecord:
        with self._files.locked():
            _check_version(record, self.get(record.volume_id))
            return self._write(record)

    def delete(self, record: VolumeRecord) -> None:
        with self._files.locked():
            current = self.get(record.volume_id)
            if current is None:
                return
            _check_version(record, current)
            self._files.remove(self._files.path(record.volume_id))

    def list(self) -> list[VolumeRecord]:
        return sorted(self._files.read_all(), key=lambda r: r.volume_id)


def _parse_volume_file(text: str, path: Path) -> VolumeRecord:
    """A record file holds ``{"version": token, "record": VolumeRecord.to_dict()}``."""
    try:
        envelope = json.loads(text)
        version, body = envelope["version"], envelope["record"]
    except (ValueError, KeyError, TypeError):
        raise errors.Internal(f"volume record {path} is damaged") from None
    record = VolumeRecord.from_dict(body, str(version), str(path))
    if path.name != f"{record.volume_id}{SUFFIX}":
        raise errors.Internal(f"volume record {path} holds volume {record.volume_id!r}")
    return record


def _check_version(wanted: VolumeRecord, current: VolumeRecord | None) -> None:
    if current is None:
        raise errors.Aborted(f"volume {wanted.volume_id} was deleted concurrently; retry")
    if current.version != wanted.version:
        raise errors.Aborted(f"volume {wanted.volume_id} was changed concurrently; retry")
