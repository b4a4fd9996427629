"""CSI snapshot RPCs of the Controller service: CreateSnapshot, DeleteSnapshot,
ListSnapshots and GetSnapshot (capabilities CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS and
GET_SNAPSHOT), and the data of a CreateVolume from a snapshot or a volume (CLONE_VOLUME).

A snapshot is a ZeroFS checkpoint of the volume's whole storage, taken by the volume's
server after a flush (``checkpoints``): per-volume and crash-consistent, every write
acknowledged before it included. It lives in the volume's own storage, under the
volume's prefix. It is ready to use once the checkpoint exists, which CreateSnapshot
waits for; its size is the volume's at that instant.

Names and ids. The snapshot's key is derived from its CreateSnapshot name as a volume id
is (``volume_id_for_name``: the name itself when it is a DNS label of at most 49
characters, else a slug and a hash), and names both its record and its checkpoint. The
snapshot id is ``<source volume id>@<key>``: what is needed to find the checkpoint, and
unambiguous since neither part holds '@'. A repeated CreateSnapshot (same name, same
source) answers the same snapshot; the same name for another source is ALREADY_EXISTS.

CreateVolume with a snapshot as its content source (``restore``) creates the new
volume's export, at least as large as the snapshot's volume, and copies the checkpoint's
export into it (``VolumeCheckpoints.restore``) before the volume is recorded; the volume
then names its snapshot in its ``content_source``. A clone (a volume as the content
source) is a restore from a checkpoint of the source volume taken for it (named
``clone:<new volume id>``, which no snapshot key can be) and deleted once copied.

DeleteVolume of a volume that has snapshots is refused (FAILED_PRECONDITION, naming
them): its checkpoints live in its storage, so deleting the volume's data would take
them along, and keeping the data of a deleted volume for its snapshots would leave
storage that no volume owns. Delete the snapshots first.

Every call that changes something holds the source volume's try-lock (shared with the
volume RPCs) and the snapshot key's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from zerofs_csi.controller.arguments import request_parameters, volume_id_argument
from zerofs_csi.controller.checkpoints import (
    CLONE_CHECKPOINT_PREFIX,
    CheckpointSource,
    JobInProgress,
    VolumeCheckpoints,
)
from zerofs_csi.controller.create_request import CreateRequest
from zerofs_csi.controller.snapshot_store import SnapshotRecord, SnapshotStore
from zerofs_csi.controller.store import VolumeRecord, VolumeStore
from zerofs_csi.csi import csi_pb2
from zerofs_csi.errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.volume.id import validate_volume_id, volume_id_for_name

log = logging.getLogger(__name__)

SEPARATOR = "@"
# ListSnapshots' next_token: this prefix and the last snapshot key of the page.
LIST_TOKEN_PREFIX = "after:"
# How many snapshot ids of a volume a refused DeleteVolume names.
NAMED_IN_REFUSAL = 5


def snapshot_id(volume_id: str, key: str) -> str:
    return f"{volume_id}{SEPARATOR}{key}"


def parse_snapshot_id(value: str) -> tuple[str, str] | None:
    """The source volume id and key of a snapshot id of this driver, None for any other
    string (which names no snapshot of it)."""
    volume_id, separator, key = value.partition(SEPARATOR)
    if not separator:
        return None
    try:
        return validate_volume_id(volume_id), validate_volume_id(key)
    except InvalidArgument:
        return None


def _lock_name(key: str) -> str:
    return f"snapshot {key}"


def _snapshot_message(record: SnapshotRecord) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        size_bytes=record.size_bytes,
        snapshot_id=record.snapshot_id,
        source_volume_id=record.source_volume_id,
        creation_time=Timestamp(seconds=record.created_at_seconds),
        ready_to_use=True,
    )


class SnapshotRpcs:
    """The snapshot RPCs over ``volumes`` (the volume records), ``snapshots`` (the
    snapshot records) and ``checkpoints`` (the volumes' servers). ``locks`` are the
    controller's per-volume try-locks."""

    def __init__(
        self,
        volumes: VolumeStore,
        snapshots: SnapshotStore,
        checkpoints: VolumeCheckpoints,
        locks: VolumeLocks,
    ) -> None:
        self._volumes = volumes
        self._snapshots = snapshots
        self._checkpoints = checkpoints
        self._locks = locks

    @property
    def restores(self) -> bool:
        """Whether volumes can be created from snapshots and volumes here."""
        return self._checkpoints.restores

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        vid = volume_id_argument(request.source_volume_id, "source_volume_id")
        key = volume_id_for_name(request.name)
        unknown = sorted(request_parameters(request.parameters))
        if unknown:
            raise InvalidArgument(
                f"snapshot parameters are not supported (got {', '.join(unknown)}): a snapshot "
                "is a checkpoint of the volume as it is"
            )
        with (
            self._locks.hold(vid, "CreateSnapshot"),
            self._locks.hold(_lock_name(key), "CreateSnapshot"),
        ):
            existing = self._snapshots.get(key)
            if existing is not None:
                if existing.name != request.name:
                    raise AlreadyExists(
                        f"snapshot key {key}, which the name {request.name!r} maps to, belongs "
                        f"to the snapshot named {existing.name!r}: choose another name"
                    )
                if existing.source_volume_id != vid:
                    raise AlreadyExists(
                        f"a snapshot named {request.name!r} exists of volume "
                        f"{existing.source_volume_id}, not of {vid}"
                    )
                return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_message(existing))
            volume = self._volumes.get(vid)
            if volume is None:
                raise NotFound(f"source volume {vid} does not exist")
            _check_writable(volume)
            checkpoint = self._checkpoints.create(
                vid, volume.parameters, bool(volume.published_node), key, request.secrets
            )
            record = SnapshotRecord(
                key=key,
                name=request.name,
                snapshot_id=snapshot_id(vid, key),
                source_volume_id=vid,
                checkpoint_id=checkpoint.id,
                size_bytes=volume.capacity_bytes,
                created_at_seconds=int(checkpoint.created_at.timestamp()),
                parameters=dict(volume.parameters),
            )
            self._snapshots.create(record)
        log.info(
            "snapshot created",
            extra={"volume_id": vid, "snapshot_id": record.snapshot_id, "checkpoint": key},
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_message(record))

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        parsed = parse_snapshot_id(request.snapshot_id)
        if parsed is None:
            return csi_pb2.DeleteSnapshotResponse()  # names no snapshot of this driver
        vid, key = parsed
        with (
            self._locks.hold(vid, "DeleteSnapshot"),
            self._locks.hold(_lock_name(key), "DeleteSnapshot"),
        ):
            record = self._snapshots.get(key)
            if record is None or record.snapshot_id != request.snapshot_id:
                return csi_pb2.DeleteSnapshotResponse()
            volume = self._volumes.get(vid)
            published = volume is not None and bool(volume.published_node)
            self._checkpoints.delete(vid, record.parameters, published, key, request.secrets)
            self._snapshots.delete(key)
        log.info("snapshot deleted", extra={"volume_id": vid, "snapshot_id": record.snapshot_id})
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        start = _listing_start(request.starting_token) if request.starting_token else ""
        records = self._snapshots.list()
        if request.snapshot_id:
            records = [r for r in records if r.snapshot_id == request.snapshot_id]
        if request.source_volume_id:
            records = [r for r in records if r.source_volume_id == request.source_volume_id]
        records = [r for r in records if r.key > start]
        page = records[: request.max_entries] if request.max_entries else records
        Entry = csi_pb2.ListSnapshotsResponse.Entry
        return csi_pb2.ListSnapshotsResponse(
            entries=[Entry(snapshot=_snapshot_message(record)) for record in page],
            next_token=LIST_TOKEN_PREFIX + page[-1].key if len(page) < len(records) else "",
        )

    def restore(self, wanted: CreateRequest, csi_secrets: Mapping[str, str]) -> int:
        """Fill the new volume of ``wanted`` from its source snapshot or volume; returns
        its capacity: the one asked for, or the source's size when that is larger (within
        the request's limit, else OUT_OF_RANGE). NOT_FOUND for an unknown source."""
        if wanted.source_volume_id:
            return self._clone(wanted, csi_secrets)
        snapshot_id_ = wanted.source_snapshot_id
        parsed = parse_snapshot_id(snapshot_id_)
        record = self._snapshots.get(parsed[1]) if parsed is not None else None
        if record is None or record.snapshot_id != snapshot_id_:
            raise NotFound(f"snapshot {snapshot_id_[:200]!r} does not exist")
        capacity = _capacity(wanted, record.size_bytes, f"snapshot {snapshot_id_}")
        with self._locks.hold(_lock_name(record.key), "CreateVolume"):
            self._fill(
                wanted,
                CheckpointSource(record.source_volume_id, record.parameters, record.key),
                capacity,
                csi_secrets,
            )
        log.info(
            "volume data restored from snapshot",
            extra={"volume_id": wanted.volume_id, "snapshot_id": snapshot_id_},
        )
        return capacity

    def _fill(
        self,
        wanted: CreateRequest,
        source: CheckpointSource,
        capacity: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        self._checkpoints.restore(
            source, wanted.volume_id, wanted.settings.to_parameters(), capacity, csi_secrets
        )

    def _clone(self, wanted: CreateRequest, csi_secrets: Mapping[str, str]) -> int:
        """A clone is a restore from a checkpoint taken for it and deleted after; or,
        where the backend copies sources staged nowhere, of such a source as it is."""
        source_id = wanted.source_volume_id
        try:
            validate_volume_id(source_id)
        except InvalidArgument:
            raise NotFound(f"source volume {source_id[:200]!r} does not exist") from None
        with self._locks.hold(source_id, "CreateVolume"):
            source = self._volumes.get(source_id)
            if source is None:
                raise NotFound(f"source volume {source_id} does not exist")
            _check_writable(source)
            capacity = _capacity(wanted, source.capacity_bytes, f"volume {source_id}")
            published = bool(source.published_node)
            if not published and self._checkpoints.copies_idle_sources:
                idle = CheckpointSource(source_id, source.parameters, None)
                self._fill(wanted, idle, capacity, csi_secrets)
                log.info(
                    "volume data copied from a volume staged nowhere",
                    extra={"volume_id": wanted.volume_id, "source": source_id},
                )
                return capacity
            checkpoint = CLONE_CHECKPOINT_PREFIX + wanted.volume_id
            self._checkpoints.create(
                source_id, source.parameters, published, checkpoint, csi_secrets
            )
            try:
                taken = CheckpointSource(source_id, source.parameters, checkpoint)
                self._fill(wanted, taken, capacity, csi_secrets)
            except JobInProgress:
                raise  # the copy reads the checkpoint on: the retry finishes the clone
            except BaseException:
                # The restore's error is the one to answer with; a retry deletes the
                # checkpoint if this cannot.
                with contextlib.suppress(CsiError):
                    self._checkpoints.delete(
                        source_id, source.parameters, published, checkpoint, csi_secrets
                    )
                raise
            self._checkpoints.delete(
                source_id, source.parameters, published, checkpoint, csi_secrets
            )
        log.info("volume data cloned", extra={"volume_id": wanted.volume_id, "source": source_id})
        return capacity

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        parsed = parse_snapshot_id(request.snapshot_id)
        record = self._snapshots.get(parsed[1]) if parsed is not None else None
        if record is None or record.snapshot_id != request.snapshot_id:
            raise NotFound(f"snapshot {request.snapshot_id[:200]!r} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=_snapshot_message(record))

    def check_publishable(self, volume_id: str) -> None:
        """UNAVAILABLE while a server started for a checkpoint writes the volume."""
        self._checkpoints.check_publishable(volume_id)

    def check_volume_has_none(self, volume_id: str) -> None:
        """FAILED_PRECONDITION when ``volume_id`` has snapshots (for DeleteVolume)."""
        ids = [r.snapshot_id for r in self._snapshots.list() if r.source_volume_id == volume_id]
        if ids:
            named = ", ".join(ids[:NAMED_IN_REFUSAL]) + (
                ", ..." if len(ids) > NAMED_IN_REFUSAL else ""
            )
            raise FailedPrecondition(
                f"volume {volume_id} has {len(ids)} snapshots ({named}), which live in its "
                "storage: delete them first"
            )


def _check_writable(volume: VolumeRecord) -> None:
    """FAILED_PRECONDITION for a ReadOnlyMany volume: only a writer of a volume takes its
    checkpoints, and none runs for it; its data is its source's anyway."""
    if volume.read_only_many:
        source = volume.source_snapshot_id or volume.source_volume_id
        raise FailedPrecondition(
            f"volume {volume.volume_id} is MULTI_NODE_READER_ONLY: its servers are read-only "
            f"and take no checkpoint; it holds the data of {source}, snapshot or clone that"
        )


def _capacity(wanted: CreateRequest, source_bytes: int, source: str) -> int:
    """The new volume's size: the one asked for, at least the source's."""
    capacity = max(wanted.capacity_bytes, source_bytes)
    limit = wanted.capacity_range.limit_bytes if wanted.capacity_range is not None else 0
    if limit and capacity > limit:
        raise OutOfRange(
            f"{source} is of a {source_bytes}-byte volume, more than "
            f"capacity_range.limit_bytes ({limit})"
        )
    return capacity


def _listing_start(token: str) -> str:
    """The snapshot key a ListSnapshots ``starting_token`` continues after; ABORTED for a
    token this driver did not hand out, as the spec says."""
    key = token.removeprefix(LIST_TOKEN_PREFIX)
    if key != token:
        try:
            return validate_volume_id(key)
        except InvalidArgument:
            pass
    raise Aborted(
        f"starting_token {token[:80]!r} is not a token of this driver: start the listing "
        "again without one"
    )
