"""A directory of JSON record files, one per key: what the controller's file stores share.

``RecordFiles`` keeps ``<directory>/<key>.json``, each written atomically (a temporary
file, fsync, rename, fsync of the directory). Writers hold an exclusive flock on
``<directory>/.lock`` (``locked``), so processes sharing the directory never interleave;
readers need no lock, as a record file is only ever replaced by rename. What a file holds
is the store's to say: it writes a JSON object and reads one back with its own parser.
Errors carry their gRPC code and name the kind of record (``what``: "volume", "snapshot").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from zerofs_csi import errors
from zerofs_csi.volume.id import validate_volume_id

R = TypeVar("R")

SUFFIX = ".json"


class RecordFiles(Generic[R]):
    """Record files of one kind; ``parse`` turns a file's text (and its path, for errors)
    into a record, raising ``errors.Internal`` for what it cannot read."""

    def __init__(self, directory: Path, what: str, parse: Callable[[str, Path], R]) -> None:
        self.directory = directory
        self._what = what
        self._parse = parse
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.Internal(
                f"cannot create the {what} metadata directory {directory}: {exc.strerror}"
            ) from None

    def path(self, key: str) -> Path:
        return self.directory / f"{validate_volume_id(key)}{SUFFIX}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, path: Path) -> R | None:
        """The record in ``path``; None when there is none."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.Internal(
                f"cannot read {self._what} record {path}: {exc.strerror}"
            ) from None
        return self._parse(text, path)

    def read_all(self) -> list[R]:
        """Every record, in the order of their file names."""
        records = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            record = self.read(path)
            if record is not None:
                records.append(record)
        return records

    def write(self, path: Path, body: Mapping[str, Any]) -> None:
        """Replace ``path`` with ``body`` as JSON; call it holding ``locked``."""
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(body, f, sort_keys=True, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            self._sync_directory()
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise errors.Internal(
                f"cannot write {self._what} record {path}: {exc.strerror}"
            ) from None

    def remove(self, path: Path) -> None:
        """Remove ``path``; succeeds when it is not there. Call it holding ``locked``."""
        try:
            path.unlink()
            self._sync_directory()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise errors.Internal(
                f"cannot delete {self._what} record {path}: {exc.strerror}"
            ) from None

    def _sync_directory(self) -> None:
        # The rename itself must reach the disk, or a crash could bring back the old record.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
