"""Staging a volume on this node, as a transaction with undo; and unstaging it.

Stage: ensure the volume's ZeroFS server, attach its NBD export as /dev/nbdX (creating
or growing the export file over 9P first when the handshake shows it missing or too
small), then for a mount volume probe it, make a filesystem only when it is fresh and
mount it at ``<staging path>/mount``. Every step registers its undo, so a failure
leaves nothing behind. The stage record is written once the device is attached, so that
unstage and recovery can find the device even when a later step or the plugin dies; it
says ``staged`` only once every step is done.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from zerofs_csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    Unavailable,
)
from zerofs_csi.host import filesystems, fsprobe, mount_options, mounts
from zerofs_csi.node import mounts as node_mounts
from zerofs_csi.node import publishing
from zerofs_csi.node.lost_writes import writes_lost
from zerofs_csi.node.stage_record import (
    ATTACHED,
    MOUNT_DIR_NAME,
    STAGED,
    RecordStore,
    StageRecord,
    backend_id_for,
)
from zerofs_csi.node.transaction import Transaction
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.servers import lives
from zerofs_csi.servers.base import ServerSockets, VolumeServerBackend
from zerofs_csi.servers.ninep import ExportFile
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

log = logging.getLogger(__name__)

MOUNT = "mount"
BLOCK = "block"
# Teardown's bounded waits: for a dead link's reconnect before unmounting, and for the
# device's last requests before disconnecting it.
LINK_WAIT_S = 120.0
DRAIN_WAIT_S = 60.0


def _in_flight(index: int) -> int:
    """Requests of nbd<index> the block layer has in flight (reads + writes in sysfs);
    0 once the device is gone."""
    try:
        with open(f"/sys/block/nbd{index}/inflight") as f:
            return sum(int(n) for n in f.read().split())
    except FileNotFoundError:
        return 0


def _wait(condition: Callable[[], bool], timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not condition():
        if time.monotonic() > deadline:
            raise Unavailable(message)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


class AttachedDevice(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def path(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...


class Attacher(Protocol):
    """The attach path (``zerofs_csi.nbd``) as staging and the node service use it."""

    def attach(
        self,
        nbd_socket: str,
        export: str,
        backend_id: str,
        connections: int | None = None,
        *,
        read_only: bool = False,
    ) -> AttachedDevice: ...

    def detach(self, index: int, backend_id: str) -> None: ...

    def find_device(self, backend_id: str) -> AttachedDevice | None: ...


PrepareExport = Callable[[str, str, int], ExportFile]


@dataclass(frozen=True)
class StageRequest:
    volume_id: str
    staging_path: str
    access_type: str  # MOUNT or BLOCK
    fs_type: str  # for MOUNT
    mount_options: tuple[str, ...]
    readonly: bool
    settings: VolumeSettings
    secrets: VolumeSecrets = field(repr=False)
    capacity_bytes: int


def mount_staged(record: StageRecord) -> None:
    """Mount a staged volume's device at its mount path with the recorded options."""
    options = mount_options.MountOptions.parse(
        [*record.mount_options, *(["ro"] if record.readonly else [])]
    )
    node_mounts.mount_filesystem(record.device, record.mount_path, record.fs_type, options)


def attach_staged(attacher: Attacher, record: StageRecord) -> AttachedDevice:
    """Attach a staged volume's export again the way its stage attached it."""
    return attacher.attach(
        record.nbd_socket,
        record.volume_id,
        record.backend_id,
        record.connections,
        read_only=record.read_only_device,
    )


def _compatible(record: StageRecord, request: StageRequest) -> bool:
    return (
        record.access_type == request.access_type
        and (request.access_type == BLOCK or record.fs_type == request.fs_type)
        and record.read_only_device == request.settings.read_only_server
    )


def _kind(access_type: str, fs_type: str, read_only_device: bool) -> str:
    """How a stage is described in errors: "read-only mount ext4", "block"."""
    return f"{'read-only ' if read_only_device else ''}{access_type} {fs_type}".rstrip()


class Stager:
    def __init__(
        self,
        backend: VolumeServerBackend,
        attacher: Attacher,
        prepare_export: PrepareExport,
        records: RecordStore,
        metrics: Metrics,
    ) -> None:
        self._backend = backend
        self._attacher = attacher
        self._prepare_export = prepare_export
        self._records = records
        self._metrics = metrics
        self._link_dead: Callable[[str], bool] = lambda _volume_id: False
        self._forget_link: Callable[[str], None] = lambda _volume_id: None

    def watch_links(
        self, link_dead: Callable[[str], bool], forget_link: Callable[[str], None]
    ) -> None:
        """Where teardown learns that a volume's NBD link is dead, and tells that the
        volume's device is gone with its stage (the link monitor)."""
        self._link_dead = link_dead
        self._forget_link = forget_link

    def _is_intact(self, record: StageRecord) -> bool:
        """The record's device is attached to its volume, and mounted where it should be."""
        device = self._attacher.find_device(record.backend_id)
        if device is None or device.index != record.device_index:
            return False
        if record.access_type == BLOCK:
            return True
        entry = mounts.find_mount(record.mount_path)
        return entry is not None and entry.source == record.device

    def _staged_elsewhere(self, volume_id: str, staging_path: str) -> str | None:
        """The other staging path the volume is staged at on this node, if any."""
        elsewhere = self._records.staging_path_of(volume_id)
        if elsewhere is None or elsewhere == staging_path:
            return None
        other = self._records.read(elsewhere)
        return elsewhere if other is not None and other.volume_id == volume_id else None

    def stage(self, request: StageRequest) -> StageRecord:
        vid = request.volume_id
        elsewhere = self._staged_elsewhere(vid, request.staging_path)
        if elsewhere is not None:
            # One device and one server per volume: a second staging would share
            # them, and its undo would tear down the first.
            raise FailedPrecondition(f"volume {vid} is already staged on this node at {elsewhere}")
        existing = self._records.read(request.staging_path)
        if existing is not None:
            if existing.volume_id != vid:
                raise AlreadyExists(
                    f"staging path {request.staging_path} holds volume {existing.volume_id}"
                )
            if not _compatible(existing, request):
                wanted = (request.access_type, request.fs_type, request.settings.read_only_server)
                raise AlreadyExists(
                    f"volume {vid} is staged as "
                    f"{_kind(existing.access_type, existing.fs_type, existing.read_only_device)}"
                    f"; this request asks for {_kind(*wanted)}"
                )
            lost = writes_lost(existing) if existing.phase == STAGED else None
            if lost is not None and publishing.publications(existing):
                # Its filesystem is in use: only its pods going lets it be staged anew.
                raise FailedPrecondition(f"volume {vid}: {lost}")
            if lost is None and existing.phase == STAGED and self._is_intact(existing):
                return existing
            log.info("restaging an incomplete stage", extra={"volume_id": vid})
            self.teardown(existing, operation="stage")

        stage = self._metrics.stage
        backend_id = backend_id_for(vid)
        with Transaction("stage", volume_id=vid) as tx:
            with stage("stage", "ensure_server", vid):
                sockets = self._backend.ensure(vid, request.settings, request.secrets)
            tx.on_undo("stop server", lambda: self._backend.stop(vid))

            # By backend id, not index: whatever device ends up serving the volume.
            tx.on_undo("detach", lambda: self._detach(backend_id))
            connections = request.settings.nbd_connections
            if request.settings.read_only_server:
                device = self._attach_read_only(sockets, vid, backend_id, connections)
                export_created = False
            else:
                device, export_created = self._attach_export(
                    sockets, vid, backend_id, request.capacity_bytes, connections
                )
            options = request.mount_options
            if (
                request.settings.read_only_server
                and request.fs_type in filesystems.NO_REPLAY_OPTIONS
            ):
                options = (*options, filesystems.NO_REPLAY_OPTIONS[request.fs_type])

            record = StageRecord(
                volume_id=vid,
                backend_id=backend_id,
                device_index=device.index,
                size_bytes=device.size_bytes,
                access_type=request.access_type,
                fs_type=request.fs_type if request.access_type == MOUNT else "",
                server_backend=self._backend.name,
                nbd_socket=str(sockets.nbd),
                staging_path=request.staging_path,
                mount_options=options,
                readonly=request.readonly,
                read_only_device=request.settings.read_only_server,
                connections=connections,
                server_life=lives.current_life(sockets.directory),
                sync_writes=request.settings.sync_writes,
                phase=ATTACHED,
            )
            self._records.write(record)
            tx.on_undo("remove record", lambda: self._records.remove(vid, request.staging_path))

            if request.access_type == MOUNT:
                self._format_if_fresh(record, request, export_created)
                with stage("stage", "mount", vid):
                    mount_staged(record)
                tx.on_undo("unmount", lambda: mounts.unmount_all(record.mount_path))
            record = dataclasses.replace(record, phase=STAGED)
            self._records.write(record)
            tx.commit()
        return record

    def _attach_export(
        self,
        sockets: ServerSockets,
        vid: str,
        backend_id: str,
        capacity_bytes: int,
        connections: int,
    ) -> tuple[AttachedDevice, bool]:
        """Attach the volume's export; return the device and whether this stage created
        the export. A volume staged before already has its export at its size, which
        the NBD handshake reports: the 9P round trips are only for a missing export or
        one the controller grew since (its connections would keep the old size)."""
        stage = self._metrics.stage
        with stage("stage", "connect_nbd", vid) as timing:
            try:
                found: AttachedDevice | None = self._attacher.attach(
                    str(sockets.nbd), vid, backend_id, connections
                )
            except NotFound:
                found = None  # a new volume: no export of that name yet
                timing.stage = "find_export"
        if found is not None:
            if found.size_bytes >= capacity_bytes:
                return found, False
            self._attacher.detach(found.index, backend_id)
        with stage("stage", "create_export", vid):
            export = self._prepare_export(str(sockets.ninep), vid, capacity_bytes)
        with stage("stage", "connect_nbd", vid):
            device = self._attacher.attach(str(sockets.nbd), vid, backend_id, connections)
        return device, export.created

    def _attach_read_only(
        self, sockets: ServerSockets, vid: str, backend_id: str, connections: int
    ) -> AttachedDevice:
        """Attach the export of a read-only server as it is: it cannot be created or
        grown, and the kernel makes the device read-only."""
        with self._metrics.stage("stage", "connect_nbd", vid):
            try:
                return self._attacher.attach(
                    str(sockets.nbd), vid, backend_id, connections, read_only=True
                )
            except NotFound:
                raise FailedPrecondition(
                    f"volume {vid} has no data to serve read-only (its export was never "
                    "created): a MULTI_NODE_READER_ONLY volume is filled from its snapshot or "
                    "volume when it is created"
                ) from None

    def _detach(self, backend_id: str) -> None:
        device = self._attacher.find_device(backend_id)
        if device is not None:
            self._attacher.detach(device.index, backend_id)

    def _format_if_fresh(
        self, record: StageRecord, request: StageRequest, export_created: bool
    ) -> None:
        vid = record.volume_id
        if self._records.formatting_interrupted(vid):
            if request.readonly:
                raise FailedPrecondition(
                    f"volume {vid} has no complete filesystem yet (an earlier mkfs was "
                    "interrupted) and is staged read-only; stage it read-write once"
                )
            log.info("formatting again after an interrupted mkfs", extra={"volume_id": vid})
            self._make_filesystem(record)
            return
        if export_created:
            # Created sparse by this stage: there is nothing on it to look for.
            contents = fsprobe.BLANK
        else:
            with self._metrics.stage("stage", "probe", vid):
                contents = fsprobe.probe(record.device, expect=record.fs_type)
        if contents.fs_type == record.fs_type:
            return
        if not contents.fresh:
            raise FailedPrecondition(
                f"volume {vid} ({record.device}) holds {contents.describe()}, but the "
                f"StorageClass asks for {record.fs_type}; refusing to format a device "
                "that holds data"
            )
        if request.readonly:
            raise FailedPrecondition(
                f"volume {vid} has no filesystem yet and is staged read-only; "
                "publish it read-write once to create one"
            )
        self._make_filesystem(record)

    def _make_filesystem(self, record: StageRecord) -> None:
        self._records.mark_formatting(record.volume_id)
        with self._metrics.stage("stage", "mkfs", record.volume_id):
            filesystems.make_filesystem(record.fs_type, record.device)
        self._records.clear_formatting(record.volume_id)

    def reattach(self, record: StageRecord) -> StageRecord:
        """Detach the staged volume's device and attach it again, unmounting meanwhile, so
        that fresh connections negotiate the export's current size. Only for a volume
        that is not published. Returns the updated record.

        FailedPrecondition, with the volume mounted again, when its filesystem is still
        held once unmounted here: a container keeps its own copy of a publication."""
        vid = record.volume_id
        stage = self._metrics.stage
        if record.access_type == MOUNT:
            with stage("expand", "umount", vid):
                node_mounts.unmount_all(record.mount_path, f"volume {vid}")
            if not node_mounts.unclaimed(record.device):
                mount_staged(record)
                raise FailedPrecondition(
                    f"the filesystem of volume {vid} is still mounted elsewhere (a running "
                    "container's copy of a publication); this driver expands volumes "
                    "offline: stop the pods using it, then retry"
                )
        with stage("expand", "disconnect_nbd", vid):
            self._attacher.detach(record.device_index, record.backend_id)
        with stage("expand", "connect_nbd", vid):
            device = attach_staged(self._attacher, record)
        record = dataclasses.replace(
            record,
            device_index=device.index,
            size_bytes=device.size_bytes,
            server_life=lives.current_life(record.socket_directory),
        )
        self._records.write(record)
        if record.access_type == MOUNT:
            with stage("expand", "mount", vid):
                mount_staged(record)
        return record

    def unstage(self, volume_id: str, staging_path: str) -> None:
        """Undo the volume's stage at ``staging_path``, and only that: a volume that is not
        staged there is answered OK (the CSI spec), without touching its stage elsewhere
        or what others keep at the path."""
        record = self._records.read(staging_path)
        if record is not None:
            if record.volume_id == volume_id:
                self.teardown(record, operation="unstage")
            else:
                log.info(
                    "unstage of a path that holds another volume: nothing to do",
                    extra={"volume_id": volume_id, "holder": record.volume_id},
                )
            return
        if self._staged_elsewhere(volume_id, staging_path) is not None:
            return  # staged at another path, which its own unstage undoes
        # Nothing recorded: a stage that failed before attaching and could not undo it,
        # or one done already. A mount left behind is ours only when it is of the
        # volume's device; its server is the volume's.
        device = self._attacher.find_device(backend_id_for(volume_id))
        if device is not None:
            node_mounts.unmount_own(
                os.path.join(staging_path, MOUNT_DIR_NAME),
                f"volume {volume_id}",
                lambda entry: entry.source == device.path,
            )
        self._backend.stop(volume_id)

    def teardown(self, record: StageRecord, operation: str) -> None:
        """Unmount, detach (only our own device), stop the server, drop the record.

        An unmount writes back what the filesystem holds: on a dead link it would wait in
        the kernel for the reconnect, beyond any RPC deadline and any kill, so teardown
        waits for the reconnect first (bounded, UNAVAILABLE after that). The device is
        disconnected, and the server stopped, only once the kernel has no request of it
        in flight: DISCONNECT fails those with EIO, and a stopped server answers none.
        A device whose server may have lost its writes is never reconnected: it is
        disconnected first, so that the unmount's writes fail instead of waiting.
        """
        vid = record.volume_id
        stage = self._metrics.stage
        device = self._attacher.find_device(record.backend_id)
        if device is not None and writes_lost(record) is not None:
            with stage(operation, "disconnect_nbd", vid):
                self._detach(record.backend_id)
            device = None
        if device is not None:
            with stage(operation, "wait_link", vid):
                _wait(
                    lambda: not self._link_dead(vid),
                    LINK_WAIT_S,
                    f"volume {vid}: its NBD link ({record.device}) is dead and was not "
                    f"reconnected within {LINK_WAIT_S:g} s; unmounting now would hang on "
                    "its writes. Retry once its server answers again",
                )
        if record.access_type == MOUNT:
            with stage(operation, "umount", vid):
                node_mounts.unmount_all(record.mount_path, f"volume {vid}")
        if device is not None:
            with stage(operation, "drain", vid):
                _wait(
                    lambda: _in_flight(device.index) == 0,
                    DRAIN_WAIT_S,
                    f"volume {vid}: {device.path} still has requests in flight after "
                    f"{DRAIN_WAIT_S:g} s; its server is kept running",
                )
        with stage(operation, "disconnect_nbd", vid):
            self._detach(record.backend_id)
        with stage(operation, "remove_server", vid):
            self._backend.stop(vid)
        try:
            os.rmdir(record.mount_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise Internal(f"cannot remove {record.mount_path}: {exc.strerror}") from None
        self._records.remove(vid, record.staging_path)
        self._forget_link(vid)
