"""The controller's snapshot records: one small record per snapshot, kept where it survives.

``SnapshotStore`` is the interface; ``FileSnapshotStore`` keeps the records as JSON files
(``<directory>/<key>.json``, the key being derived from the snapshot's name), written
atomically under an exclusive flock (``record_files.RecordFiles``, as volume records are).
A record says which volume and checkpoint the snapshot is, its size and creation time,
and the volume's settings, so that the snapshot can be deleted from its record alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from zerofs_csi import errors
from zerofs_csi.controller.record_files import RecordFiles

RECORD_SCHEMA = 1


@dataclass(frozen=True)
class SnapshotRecord:
    """What the controller knows about one snapshot.

    ``key`` is derived from the CreateSnapshot ``name`` (``volume_id_for_name``) and is
    also the name of the volume's checkpoint; ``snapshot_id`` encodes the source volume
    and the key (``snapshots.snapshot_id``). ``parameters`` are the source volume's
    settings (``VolumeSettings.to_parameters``) when the snapshot was taken.
    ``created_at_seconds`` is the checkpoint's creation time.
    """

    key: str
    name: str
    snapshot_id: str
    source_volume_id: str
    checkpoint_id: str
    size_bytes: int
    created_at_seconds: int
    parameters: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECORD_SCHEMA,
            "key": self.key,
            "name": self.name,
            "snapshotId": self.snapshot_id,
            "sourceVolumeId": self.source_volume_id,
            "checkpointId": self.checkpoint_id,
            "sizeBytes": self.size_bytes,
            "createdAtSeconds": self.created_at_seconds,
            "parameters": dict(self.parameters),
        }

    @classmethod
    def from_dict(cls, body: Any, where: str) -> SnapshotRecord:
        if not isinstance(body, dict) or body.get("schema") != RECORD_SCHEMA:
            raise errors.Internal(f"snapshot record {where} is not a schema {RECORD_SCHEMA} record")
        try:
            record = cls(
                key=str(body["key"]),
                name=str(body["name"]),
                snapshot_id=str(body["snapshotId"]),
                source_volume_id=str(body["sourceVolumeId"]),
                checkpoint_id=str(body["checkpointId"]),
                size_bytes=int(body["sizeBytes"]),
                created_at_seconds=int(body["createdAtSeconds"]),
                parameters={str(k): str(v) for k, v in dict(body["parameters"]).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.Internal(f"snapshot record {where} is damaged: {exc}") from None
        return record


class SnapshotStore(Protocol):
    def get(self, key: str) -> SnapshotRecord | None: ...

    def create(self, record: SnapshotRecord) -> None:
        """Store a new record; Aborted when the key has one already."""
        ...

    def delete(self, key: str) -> None:
        """Remove the record; succeeds when there is none."""
        ...

    def list(self) -> list[SnapshotRecord]:
        """Every record, sorted by key."""
        ...


class FileSnapshotStore:
    """Records as ``<directory>/<key>.json`` (``record_files.RecordFiles``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files = RecordFiles(directory, "snapshot", _parse_snapshot_file)

    def get(self, key: str) -> SnapshotRecord | None:
        return self._files.read(self._files.path(key))

    def create(self, record: SnapshotRecord) -> None:
        path = self._files.path(record.key)
        with self._files.locked():
            if path.exists():
                raise errors.Aborted(f"snapshot {record.name!r} was created concurrently; retry")
            self._files.write(path, record.to_dict())

    def delete(self, key: str) -> None:
        path = self._files.path(key)
        with self._files.locked():
            self._files.remove(path)

    def list(self) -> list[SnapshotRecord]:
        return sorted(self._files.read_all(), key=lambda r: r.key)


def _parse_snapshot_file(text: str, path: Path) -> SnapshotRecord:
    try:
        body = json.loads(text)
    except ValueError:
        raise errors.Internal(f"snapshot record {path} is not valid JSON") from None
    return SnapshotRecord.from_dict(body, str(path))
