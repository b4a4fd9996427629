"""The controller's snapshot records: one small record per snapshot, kept where it survives.

``SnapshotStore`` is the interface; ``FileSnapshotStore`` keeps the records as JSON files
(``<directory>/<key>.json``, the key being derived from the snapshot's name), written
atomically under an exclusive flock as ``store.FileVolumeStore`` writes volume records.
A record says which volume and checkpoint the snapshot is, its size and creation time,
and the volume's settings, so that the snapshot can be deleted from its record alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from zerofs_csi import errors
from zerofs_csi.volume.id import validate_volume_id

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
    _SUFFIX = ".json"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.Internal(
                f"cannot create the snapshot metadata directory {directory}: {exc.strerror}"
            ) from None

    def _path(self, key: str) -> Path:
        return self.directory / f"{validate_volume_id(key)}{self._SUFFIX}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self, path: Path) -> SnapshotRecord | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.Internal(f"cannot read snapshot record {path}: {exc.strerror}") from None
        try:
            body = json.loads(text)
        except ValueError:
            raise errors.Internal(f"snapshot record {path} is not valid JSON") from None
        return SnapshotRecord.from_dict(body, str(path))

    def get(self, key: str) -> SnapshotRecord | None:
        return self._read(self._path(key))

    def create(self, record: SnapshotRecord) -> None:
        path = self._path(record.key)
        with self._locked():
            if path.exists():
                raise errors.Aborted(f"snapshot {record.name!r} was created concurrently; retry")
            temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(temporary, "w", encoding="utf-8") as f:
                    json.dump(record.to_dict(), f, sort_keys=True, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
                self._sync_directory()
            except OSError as exc:
                temporary.unlink(missing_ok=True)
                raise errors.Internal(
                    f"cannot write snapshot record {path}: {exc.strerror}"
                ) from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise errors.Internal(
                    f"cannot delete snapshot record {path}: {exc.strerror}"
                ) from None
            self._sync_directory()

    def list(self) -> list[SnapshotRecord]:
        records = []
        for path in sorted(self.directory.glob(f"*{self._SUFFIX}")):
            record = self._read(path)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: r.key)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
