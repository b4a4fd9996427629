"""The record of a staged volume, kept beside its staging path and indexed in the state dir.

``<staging path>/zerofs-volume.json`` says which device, server and NBD backend id
belong to the volume; it is the source of truth for unstage and for recovery after a
plugin restart. ``<state dir>/staged/<volume id>.json`` points at the staging path, so
that recovery can find every record without scanning kubelet's directories.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from zerofs_csi.volume.settings import DEFAULT_NBD_CONNECTIONS

RECORD_NAME = "zerofs-volume.json"
MOUNT_DIR_NAME = "mount"
VERSION = 1
# Devices this driver attaches carry this prefix in their NBD backend identifier, which
# is how recovery tells our devices from anybody else's.
BACKEND_PREFIX = "zerofs-csi:"
# How far a stage got. The record is first written right after the device is attached
# (ATTACHED) and rewritten as STAGED once everything is done: a record still ATTACHED
# after a plugin restart belongs to a stage that died half way and is rolled back.
ATTACHED = "attached"
STAGED = "staged"


def backend_id_for(volume_id: str) -> str:
    return f"{BACKEND_PREFIX}{volume_id}"


def volume_of_backend(backend_id: str) -> str | None:
    """The volume id of one of our devices, or None for a device that is not ours."""
    if backend_id.startswith(BACKEND_PREFIX):
        return backend_id[len(BACKEND_PREFIX) :] or None
    return None


@dataclass(frozen=True)
class Publication:
    """A target the volume is published at. Written into the stage record before the
    target is made, so that unpublish knows the target for the driver's even when the
    publish died half way, and after a plugin restart."""

    target: str
    access_mode: str  # the name of the CSI access mode it was published with
    readonly: bool


@dataclass(frozen=True)
class StageRecord:
    volume_id: str
    backend_id: str
    device_index: int
    size_bytes: int
    access_type: str  # "mount" or "block"
    fs_type: str  # empty for block volumes
    server_backend: str  # "process" or "kubernetes"
    nbd_socket: str
    staging_path: str
    mount_options: tuple[str, ...] = ()
    readonly: bool = False
    # The kernel was told the device is read-only (a read-only server's export): every
    # later attach of the record must say so again, or the device comes back writable.
    read_only_device: bool = False
    # NBD connections asked for (a server without multi-conn gets one); records from
    # before the setting existed were attached with the default.
    connections: int = DEFAULT_NBD_CONNECTIONS
    # The life of the volume's server the device was attached to (servers.lives; 0 when
    # none was recorded), and whether that server makes each write durable before it
    # answers: together they say whether the device may be connected to a later server.
    server_life: int = 0
    sync_writes: bool = False
    # Records from before publications were kept have none: their publications are
    # known by their mounts only.
    publications: tuple[Publication, ...] = ()
    phase: str = STAGED
    version: int = VERSION

    @property
    def device(self) -> str:
        return f"/dev/nbd{self.device_index}"

    @property
    def socket_directory(self) -> Path:
        """The volume server's socket directory, where its lives are recorded."""
        return Path(self.nbd_socket).parent

    @property
    def mount_path(self) -> str:
        return os.path.join(self.staging_path, MOUNT_DIR_NAME)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class RecordStore:
    def __init__(self, state_dir: Path) -> None:
        self.index_dir = state_dir / "staged"
        self.formatting_dir = state_dir / "formatting"

    def _index(self, volume_id: str) -> Path:
        return self.index_dir / f"{volume_id}.json"

    def write(self, record: StageRecord) -> None:
        # Index first: recovery finds records through the index, and an index entry
        # without a record (a crash in between) is dropped, while a record without one
        # would be left behind in the staging path.
        # A later phase of the same stage finds its index in place already.
        try:
            indexed = self.staging_path_of(record.volume_id)
        except (ValueError, KeyError, TypeError):
            indexed = None  # unreadable: written anew
        if indexed != record.staging_path:
            self.index_dir.mkdir(parents=True, exist_ok=True)
            index = json.dumps({"staging_path": record.staging_path, "version": VERSION})
            _atomic_write(self._index(record.volume_id), index.encode())
        payload = json.dumps(asdict(record), indent=1, sort_keys=True).encode()
        _atomic_write(Path(record.staging_path) / RECORD_NAME, payload)

    def read(self, staging_path: str) -> StageRecord | None:
        """The record of the stage at ``staging_path``; None when absent, or when the
        record found there is of another path (reached through a symlink).
        ValueError when unreadable."""
        try:
            raw = (Path(staging_path) / RECORD_NAME).read_bytes()
        except FileNotFoundError:
            return None
        data = json.loads(raw)
        if data.get("version") != VERSION:
            raise ValueError(f"stage record version {data.get('version')!r} is not {VERSION}")
        data["mount_options"] = tuple(data.get("mount_options", ()))
        data["publications"] = tuple(Publication(**p) for p in data.get("publications", ()))
        record = StageRecord(**data)
        return record if record.staging_path == staging_path else None

    def staging_path_of(self, volume_id: str) -> str | None:
        try:
            data = json.loads(self._index(volume_id).read_bytes())
        except FileNotFoundError:
            return None
        return str(data["staging_path"])

    def is_staged(self, volume_id: str) -> bool:
        """Whether the volume is staged here and its stage finished (a filesystem or a
        block volume); False for an unreadable record."""
        try:
            staging_path = self.staging_path_of(volume_id)
            record = self.read(staging_path) if staging_path is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return record is not None and record.phase == STAGED

    def mounted_filesystem(self, volume_id: str) -> tuple[str, str] | None:
        """Where the volume's filesystem is mounted when it is staged here with one, and
        its device: (mount path, /dev/nbdX); None otherwise (not staged, a block volume,
        a stage not finished, an unreadable record)."""
        try:
            staging_path = self.staging_path_of(volume_id)
            record = self.read(staging_path) if staging_path is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if record is None or record.access_type != "mount" or record.phase != STAGED:
            return None
        return record.mount_path, record.device

    def indexed_volumes(self) -> list[str]:
        if not self.index_dir.is_dir():
            return []
        return sorted(p.stem for p in self.index_dir.glob("*.json"))

    def remove(self, volume_id: str, staging_path: str) -> None:
        (Path(staging_path) / RECORD_NAME).unlink(missing_ok=True)
        self.remove_index(volume_id)

    def remove_index(self, volume_id: str) -> None:
        self._index(volume_id).unlink(missing_ok=True)

    # A mkfs that was started and has not finished leaves a device that is neither fresh
    # nor a filesystem. This marker, set before mkfs and cleared after it succeeded,
    # says that the partial contents are ours (the device was fresh when mkfs began and
    # nothing has mounted it since), so the next stage may format it again.

    def _formatting(self, volume_id: str) -> Path:
        return self.formatting_dir / volume_id

    def mark_formatting(self, volume_id: str) -> None:
        self.formatting_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._formatting(volume_id), b"")

    def formatting_interrupted(self, volume_id: str) -> bool:
        return self._formatting(volume_id).exists()

    def clear_formatting(self, volume_id: str) -> None:
        self._formatting(volume_id).unlink(missing_ok=True)
