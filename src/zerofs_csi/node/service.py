"""CSI Node service: stage once per node, publish by bind mount."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from zerofs_csi.host import filesystems
from zerofs_csi.node import mounts as node_mounts
from zerofs_csi.node import publishing
from zerofs_csi.node.lost_writes import writes_lost
from zerofs_csi.node.stage_record import STAGED, RecordStore, StageRecord
from zerofs_csi.node.staging import Attacher, PrepareExport, Stager, StageRequest
from zerofs_csi.observability.events import EventRecorder
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.rpc.servicer import answer_unimplemented
from zerofs_csi.servers.base import VolumeServerBackend
from zerofs_csi.volume.capabilities import Mode, check_capability
from zerofs_csi.volume.context import parse_volume_context
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets

log = logging.getLogger(__name__)

RPC = csi_pb2.NodeServiceCapability.RPC
NODE_CAPABILITIES = (
    RPC.STAGE_UNSTAGE_VOLUME,
    RPC.GET_VOLUME_STATS,
    RPC.EXPAND_VOLUME,
    RPC.VOLUME_CONDITION,
    RPC.SINGLE_NODE_MULTI_WRITER,
)


def _absolute(path: str, field: str) -> str:
    if not path:
        raise InvalidArgument(f"{field} is required")
    if not os.path.isabs(path) or "\x00" in path:
        raise InvalidArgument(f"{field} must be an absolute path, got {path!r}")
    return os.path.normpath(path)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        node_id: str,
        max_volumes_per_node: int,
        stager: Stager,
        records: RecordStore,
        backend: VolumeServerBackend,
        attacher: Attacher,
        prepare_export: PrepareExport,
        link_dead: Callable[[str], bool],
        locks: VolumeLocks,
        events: EventRecorder,
    ) -> None:
        self._node_id = node_id
        self._max_volumes = max_volumes_per_node
        self._stager = stager
        self._records = records
        self._backend = backend
        self._attacher = attacher
        self._prepare_export = prepare_export
        self._link_dead = link_dead
        self._locks = locks
        self._events = events

    # -- stage -------------------------------------------------------------------

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        vid = validate_volume_id(request.volume_id)
        staging = _absolute(request.staging_target_path, "staging_target_path")
        cap = check_capability(
            request.volume_capability if request.HasField("volume_capability") else None,
            "volume_capability",
        )
        settings, capacity = parse_volume_context(request.volume_context)
        if cap.many_readers:  # ReadOnlyMany: one of many read-only servers, never written
            settings = dataclasses.replace(settings, read_only_server=True)
        fs_type = cap.fs_type or settings.filesystem
        secrets = VolumeSecrets.from_csi_secrets(request.secrets)
        secrets.check_server_accepts_password()
        with self._locks.hold(vid, "NodeStageVolume"), self._event_on_failure(vid, request):
            node_mounts.make(staging, "directory")
            self._stager.stage(
                StageRequest(
                    volume_id=vid,
                    staging_path=staging,
                    access_type=cap.access_type,
                    fs_type=fs_type if cap.access_type == "mount" else "",
                    mount_options=cap.mount_flags,
                    readonly=cap.read_only,
                    settings=settings,
                    secrets=secrets,
                    capacity_bytes=capacity,
                )
            )
        return csi_pb2.NodeStageVolumeResponse()

    @contextmanager
    def _event_on_failure(
        self, vid: str, request: csi_pb2.NodeStageVolumeRequest
    ) -> Iterator[None]:
        """Failures a user must act on also become an Event on the claim."""
        try:
            yield
        except FailedPrecondition as exc:
            self._events.warning(vid, "StageRefused", exc.message, request.volume_context)
            raise
        except (DeadlineExceeded, Unavailable) as exc:
            self._events.warning(vid, "VolumeServerNotReady", exc.message, request.volume_context)
            raise

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        vid = validate_volume_id(request.volume_id)
        staging = _absolute(request.staging_target_path, "staging_target_path")
        with self._locks.hold(vid, "NodeUnstageVolume"):
            record = self._records.read(staging)
            if record is not None and record.volume_id == vid:
                targets = publishing.publications(record)
                if targets:
                    # Detaching under a published filesystem would fail the pod's I/O.
                    raise FailedPrecondition(
                        f"volume {vid} is still published at {', '.join(targets)}; "
                        "unpublish it first"
                    )
            self._stager.unstage(vid, staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish -----------------------------------------------------------------

    def _staged(self, vid: str, staging: str) -> StageRecord:
        record = self._records.read(staging)
        if record is None or record.volume_id != vid or record.phase != STAGED:
            raise FailedPrecondition(f"volume {vid} is not staged at {staging}")
        return record

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        vid = validate_volume_id(request.volume_id)
        staging = _absolute(request.staging_target_path, "staging_target_path")
        target = _absolute(request.target_path, "target_path")
        cap = check_capability(
            request.volume_capability if request.HasField("volume_capability") else None,
            "volume_capability",
        )
        with self._locks.hold(vid, "NodePublishVolume"):
            record = self._staged(vid, staging)
            if record.access_type != cap.access_type:
                raise InvalidArgument(
                    f"volume {vid} is staged as {record.access_type}, "
                    f"publish asks for {cap.access_type}"
                )
            publishing.publish(
                self._records,
                record,
                target,
                access_mode=Mode.Mode.Name(request.volume_capability.access_mode.mode),
                readonly=request.readonly or cap.read_only,
            )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid = validate_volume_id(request.volume_id)
        target = _absolute(request.target_path, "target_path")
        with self._locks.hold(vid, "NodeUnpublishVolume"):
            staging = self._records.staging_path_of(vid)
            record = self._records.read(staging) if staging else None
            if record is not None and record.volume_id != vid:
                record = None
            publishing.unpublish(self._records, record, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- stats and expansion -------------------------------------------------------

    def _record_of(self, vid: str, staging: str = "") -> StageRecord:
        """The volume's stage record (at ``staging`` when given), or NotFound."""
        indexed = self._records.staging_path_of(vid)
        if staging and os.path.normpath(staging) != indexed:
            indexed = None
        record = self._records.read(indexed) if indexed else None
        if record is None or record.volume_id != vid:
            where = f" at {staging}" if staging else ""
            raise NotFound(f"volume {vid} is not staged{where} on node {self._node_id}")
        return record

    def _measured_path(self, record: StageRecord, volume_path: str) -> str:
        """What to measure for ``volume_path``, which must be where the volume is staged
        or published (the spec's NOT_FOUND: "does not exist on specified volume_path")."""
        path = os.path.normpath(volume_path) if os.path.isabs(volume_path) else ""
        if path in (record.staging_path, record.mount_path):
            return record.device if record.access_type == "block" else record.mount_path
        if path and path in publishing.publications(record):
            return path
        raise NotFound(
            f"volume {record.volume_id} is not staged or published at {volume_path!r} "
            f"on node {self._node_id}"
        )

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        vid = validate_volume_id(request.volume_id)
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        record = self._record_of(vid, request.staging_target_path)
        path = self._measured_path(record, request.volume_path)
        usage = []
        Unit = csi_pb2.VolumeUsage.Unit
        if stat.S_ISBLK(os.stat(path).st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                total = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            usage.append(csi_pb2.VolumeUsage(unit=Unit.BYTES, total=total))
        else:
            st = os.statvfs(path)
            usage.append(
                csi_pb2.VolumeUsage(
                    unit=Unit.BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                )
            )
            usage.append(
                csi_pb2.VolumeUsage(
                    unit=Unit.INODES,
                    total=st.f_files,
                    available=st.f_favail,
                    used=st.f_files - st.f_ffree,
                )
            )
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=self._condition(record)
        )

    def _condition(self, record: StageRecord) -> csi_pb2.VolumeCondition:
        lost = writes_lost(record)
        if lost is not None:
            return csi_pb2.VolumeCondition(abnormal=True, message=lost)
        if self._link_dead(record.volume_id):
            return csi_pb2.VolumeCondition(
                abnormal=True,
                message=f"the NBD connection of {record.device} to its ZeroFS server is dead; "
                "reconnecting",
            )
        device = self._attacher.find_device(record.backend_id)
        if device is None or device.index != record.device_index:
            return csi_pb2.VolumeCondition(
                abnormal=True, message=f"{record.device} is no longer attached to this volume"
            )
        return csi_pb2.VolumeCondition(abnormal=False, message="attached and connected")

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        vid = validate_volume_id(request.volume_id)
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        # capacity_range is optional: without it the filesystem grows to fill the device.
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range bytes must not be negative")
        with self._locks.hold(vid, "NodeExpandVolume"):
            record = self._record_of(vid, request.staging_target_path)
            _absolute(request.volume_path, "volume_path")
            if required == 0:
                if record.access_type == "mount":
                    filesystems.grow_filesystem(record.fs_type, record.device, record.mount_path)
                return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=record.size_bytes)
            sockets = self._backend.sockets(vid)
            size = self._prepare_export(str(sockets.ninep), vid, required).size_bytes
            if limit and size > limit:
                raise OutOfRange(f"volume {vid} is already {size} bytes, above limit {limit}")
            device = self._attacher.find_device(record.backend_id)
            if device is None:
                raise FailedPrecondition(f"volume {vid} is not attached on this node")
            if device.size_bytes < size:
                # The server gives a connection the export size it had at negotiation,
                # and the kernel replaces only dead connections: the device grows by
                # attaching it again, which the workload must not see. Hence offline.
                # kubelet expands a filesystem on mount once it has published it to the
                # pod and before it starts the pod's containers: that one publication is
                # set aside meanwhile (reattach refuses if a container holds it after all).
                own = os.path.normpath(request.volume_path)
                on_mount = record.access_type == "mount"
                targets = [
                    t for t in publishing.publications(record) if not (on_mount and t == own)
                ]
                if targets:
                    raise FailedPrecondition(
                        f"volume {vid} is published at {', '.join(targets)}; this driver "
                        "expands volumes offline: stop the pods using it, then retry"
                    )
                with publishing.set_aside(self._records, record, own):
                    record = self._stager.reattach(record)
                if record.size_bytes < size:
                    raise Internal(
                        f"{record.device} came back with {record.size_bytes} bytes after the "
                        f"export of volume {vid} grew to {size}"
                    )
            if record.access_type == "mount":
                filesystems.grow_filesystem(record.fs_type, record.device, record.mount_path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    # -- info ----------------------------------------------------------------------

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id, max_volumes_per_node=self._max_volumes
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=RPC(type=kind)) for kind in NODE_CAPABILITIES
            ]
        )


answer_unimplemented(NodeService, csi_pb2_grpc.NodeServicer, "Node")
