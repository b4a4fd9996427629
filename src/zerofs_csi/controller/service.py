"""CSI Controller service: volumes as records in a ``VolumeStore``.

A volume is a key prefix in the object store, written only by its ZeroFS server: the
controller creates nothing there. CreateVolume derives the volume id from the name
(``volume_id.volume_id_for_name``), validates the request and records the volume (name,
size, settings, volume context); the store keeps that state across controller restarts
(files in the state directory, or one ConfigMap per volume in Kubernetes).
ControllerPublish records the one node that may use the volume (one ZeroFS writer per
volume) once the ``NodeDirectory`` confirmed that the node exists and is below its
attach limit; DeleteVolume removes any per-volume server objects left behind and, with
``deleteDataOnPVCDelete``, the volume's objects.

GetCapacity is not offered: the object store behind a volume has no capacity the
driver can know or that a volume would use up (buckets grow on demand, quotas live in
the store's own administration), so any number reported would be invented. Volumes
are reachable from every node, so no topology is reported either.

Arguments are checked before any state is touched, in ``arguments`` and, for
CreateVolume, ``create_request``. Every mutating call holds the volume's try-lock (a
concurrent call on the same volume gets ABORTED at once); the store's compare-and-swap
guards against other controller processes. A publish to a node with an attach limit
also holds the node's lock, so that the count of its volumes and the new one are one
step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import grpc

from zerofs_csi.controller import s3cleanup
from zerofs_csi.controller.arguments import (
    LIST_TOKEN_PREFIX,
    capacity_for,
    listing_start,
    node_id_argument,
    request_parameters,
    volume_id_argument,
)
from zerofs_csi.controller.checkpoints import JobInProgress, VolumeCheckpoints
from zerofs_csi.controller.create_request import (
    ConfigMapReader,
    CreateRequest,
    check_compatible,
    config_maps_unavailable,
    create_request,
)
from zerofs_csi.controller.nodes import NodeDirectory
from zerofs_csi.controller.snapshot_store import SnapshotStore
from zerofs_csi.controller.snapshots import SnapshotRpcs
from zerofs_csi.controller.store import VolumeRecord, VolumeStore
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.errors import (
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from zerofs_csi.observability.events import EventRecorder, LogEventRecorder
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.rpc.servicer import answer_unimplemented
from zerofs_csi.volume.capabilities import (
    check_capability,
    read_only_many_conflict,
    unsupported_reason,
)
from zerofs_csi.volume.context import build_volume_context
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings, parse_volume_settings

log = logging.getLogger(__name__)

RPC = csi_pb2.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.PUBLISH_UNPUBLISH_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.GET_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
# Offered where the controller can reach the volumes' servers (``checkpoints``).
SNAPSHOT_CAPABILITIES = (
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.GET_SNAPSHOT,
    RPC.CLONE_VOLUME,
)

# Removes every per-volume server object of a volume, on any node; idempotent.
ServerRemover = Callable[[str], None]
# Deletes the volume's objects from the store; returns how many were deleted.
DataDeleter = Callable[[VolumeSettings, str, VolumeSecrets], int]


def no_server_objects(volume_id: str) -> None:
    """The server remover where servers are node-local processes, stopped at unstage."""


def _delete_volume_data(settings: VolumeSettings, volume_id: str, secrets: VolumeSecrets) -> int:
    return s3cleanup.delete_volume_data(settings, volume_id, secrets)


def _volume_message(record: VolumeRecord) -> csi_pb2.Volume:
    volume = csi_pb2.Volume(
        volume_id=record.volume_id,
        capacity_bytes=record.capacity_bytes,
        volume_context=dict(record.volume_context),
    )
    if record.source_snapshot_id:
        volume.content_source.snapshot.snapshot_id = record.source_snapshot_id
    elif record.source_volume_id:
        volume.content_source.volume.volume_id = record.source_volume_id
    return volume


class ControllerService(csi_pb2_grpc.ControllerServicer):
    """The Controller service over ``store``.

    ``nodes`` says which nodes exist and their attach limits; ``read_config_map``
    resolves ``configMapName`` (Kubernetes: the driver's namespace); ``remove_servers``
    removes a volume's server objects on every node; ``delete_data`` deletes a volume's
    objects for ``deleteDataOnPVCDelete``. With ``snapshot_store`` and ``checkpoints``
    the snapshot RPCs are offered (``snapshots``).
    """

    def __init__(
        self,
        store: VolumeStore,
        metrics: Metrics,
        *,
        nodes: NodeDirectory,
        read_config_map: ConfigMapReader = config_maps_unavailable,
        remove_servers: ServerRemover = no_server_objects,
        delete_data: DataDeleter = _delete_volume_data,
        events: EventRecorder | None = None,
        snapshot_store: SnapshotStore | None = None,
        checkpoints: VolumeCheckpoints | None = None,
    ) -> None:
        self._store = store
        self._nodes = nodes
        self._events: EventRecorder = events if events is not None else LogEventRecorder()
        self._metrics = metrics
        self._read_config_map = read_config_map
        self._remove_servers = remove_servers
        self._delete_data = delete_data
        self._locks = VolumeLocks()
        self._snapshots: SnapshotRpcs | None = None
        if snapshot_store is not None and checkpoints is not None:
            self._snapshots = SnapshotRpcs(store, snapshot_store, checkpoints, self._locks)
        self._node_locks_guard = threading.Lock()
        self._node_locks: dict[str, threading.Lock] = {}

    def _node_lock(self, node: str) -> threading.Lock:
        with self._node_locks_guard:
            return self._node_locks.setdefault(node, threading.Lock())

    # -- capabilities ------------------------------------------------------------

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        capability = csi_pb2.ControllerServiceCapability
        offered = list(CONTROLLER_CAPABILITIES)
        if self._snapshots is not None:
            offered += [
                rpc
                for rpc in SNAPSHOT_CAPABILITIES
                if rpc != RPC.CLONE_VOLUME or self._snapshots.restores
            ]
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[capability(rpc=capability.RPC(type=rpc)) for rpc in offered]
        )

    # -- create / delete ---------------------------------------------------------

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        wanted = create_request(request, self._read_config_map)
        vid, name, capacity = wanted.volume_id, wanted.name, wanted.capacity_bytes
        if wanted.has_source and (self._snapshots is None or not self._snapshots.restores):
            raise InvalidArgument(
                "volume_content_source: this controller's backend creates no volume from a "
                "snapshot or a volume"
            )
        with self._locks.hold(vid, "CreateVolume"):
            existing = self._store.get(vid)
            if existing is not None:
                check_compatible(existing, wanted)
                return csi_pb2.CreateVolumeResponse(volume=_volume_message(existing))
            if wanted.has_source:
                capacity = self._restore(wanted, request.secrets, request.parameters)
            record = self._store.create(
                VolumeRecord(
                    volume_id=vid,
                    name=name,
                    capacity_bytes=capacity,
                    parameters=wanted.settings.to_parameters(),
                    request_parameters=wanted.parameters,
                    volume_context=build_volume_context(
                        wanted.settings, capacity, request.parameters
                    ),
                    source_snapshot_id=wanted.source_snapshot_id,
                    source_volume_id=wanted.source_volume_id,
                    read_only_many=wanted.read_only_many,
                )
            )
        log.info(
            "volume created",
            extra={"volume_id": vid, "volume_name": name, "capacity_bytes": capacity},
        )
        return csi_pb2.CreateVolumeResponse(volume=_volume_message(record))

    def _restore(
        self, wanted: CreateRequest, csi_secrets: Mapping[str, str], parameters: Mapping[str, str]
    ) -> int:
        """The new volume's data first: a failure leaves no record, and a retry copies
        again. A copy that takes the CO's retries (a restore pod) is told on the claim,
        with how far it got, and so is its end."""
        assert self._snapshots is not None
        vid = wanted.volume_id
        source = (
            f"volume {wanted.source_volume_id}"
            if wanted.source_volume_id
            else f"snapshot {wanted.source_snapshot_id}"
        )
        try:
            capacity = self._snapshots.restore(wanted, csi_secrets)
        except JobInProgress as exc:
            self._events.normal(vid, "RestoreInProgress", exc.message, parameters)
            raise
        self._events.normal(vid, "Restored", f"volume {vid} holds the data of {source}", parameters)
        return capacity

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        vid = volume_id_argument(request.volume_id)
        with self._locks.hold(vid, "DeleteVolume"):
            record = self._store.get(vid)
            if record is not None and record.published_nodes:
                raise FailedPrecondition(
                    f"volume {vid} is still published to node "
                    f"{', '.join(record.published_nodes)}; "
                    "ControllerUnpublishVolume it first"
                )
            if self._snapshots is not None:
                self._snapshots.check_volume_has_none(vid)
            # Also without a record: a volume of the Go driver has none, and its server
            # pod must still go.
            with self._metrics.stage("delete", "remove_server", vid):
                self._remove_servers(vid)
            if record is None:
                return csi_pb2.DeleteVolumeResponse()
            settings = parse_volume_settings(record.parameters)
            if settings.delete_data_on_pvc_delete:
                self._delete_objects(vid, settings, request.secrets, record.volume_context)
            with self._metrics.stage("delete", "delete_record", vid):
                self._store.delete(record)
        log.info("volume deleted", extra={"volume_id": vid})
        return csi_pb2.DeleteVolumeResponse()

    def _delete_objects(
        self,
        vid: str,
        settings: VolumeSettings,
        csi_secrets: Mapping[str, str],
        volume_context: Mapping[str, str],
    ) -> None:
        try:
            secrets = VolumeSecrets.from_csi_secrets(csi_secrets)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"volume {vid} has deleteDataOnPVCDelete and needs the provisioner secret "
                f"to delete its data: {exc.message}"
            ) from None
        try:
            with self._metrics.stage("delete", "s3_cleanup", vid):
                deleted = self._delete_data(settings, vid, secrets)
        except CsiError as exc:
            if isinstance(exc, FailedPrecondition):  # a guardrail refused: a user must look
                self._events.warning(vid, "DataCleanupRefused", exc.message, volume_context)
            # The record stays, so the CO's retry of DeleteVolume tries the cleanup again.
            raise Unavailable(
                f"deleting the data of volume {vid} failed, the volume is kept and the "
                f"deletion can be retried: {exc.message}",
                reason=exc.reason,
            ) from None
        self._metrics.s3_objects_deleted.labels(self._metrics.node).inc(deleted)
        log.info(
            "deleted %d objects of the volume from the object store",
            deleted,
            extra={"volume_id": vid, "objects_deleted": deleted},
        )

    # -- publish -----------------------------------------------------------------

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        vid = volume_id_argument(request.volume_id)
        node = node_id_argument(request.node_id)
        cap = check_capability(
            request.volume_capability if request.HasField("volume_capability") else None,
            "volume_capability",
        )
        if request.readonly:
            # The spec: the CO sets readonly only for plugins with PUBLISH_READONLY,
            # which this one does not offer; read-only use is a read-only access mode.
            raise InvalidArgument(
                "readonly publish is not supported (no PUBLISH_READONLY capability); use the "
                "SINGLE_NODE_READER_ONLY access mode or a read-only NodePublish"
            )
        with self._locks.hold(vid, "ControllerPublishVolume"):
            record = self._store.get(vid)
            if record is None:
                raise NotFound(f"volume {vid} does not exist")
            conflict = read_only_many_conflict([cap], record.read_only_many)
            if conflict:
                raise InvalidArgument(f"volume_capability: {conflict}")
            if node in record.published_nodes:
                return csi_pb2.ControllerPublishVolumeResponse()
            if self._snapshots is not None:
                self._snapshots.check_publishable(vid)
            if record.published_node:
                raise FailedPrecondition(
                    f"volume {vid} is published to node {record.published_node}: a ZeroFS "
                    "volume has a single writer, so it can be used on one node at a time; "
                    "unpublish it there first"
                )
            if record.read_only_many:  # a reader more, beside the others
                published = record.replace(reader_nodes=(*record.reader_nodes, node))
            else:
                published = record.replace(published_node=node)
            limit = self._nodes.attach_limit(node)
            if not limit:
                self._store.update(published)
            else:
                # Counted and recorded under the node's lock, so that publishes of other
                # volumes to the same node cannot both take its last place.
                with self._node_lock(node):
                    count = sum(1 for r in self._store.list() if node in r.published_nodes)
                    if count >= limit:
                        raise ResourceExhausted(
                            f"node {node} already has {count} volumes published, its "
                            f"limit is {limit} volumes (max_volumes_per_node): unpublish one "
                            "there first"
                        )
                    self._store.update(published)
        log.info("volume published", extra={"volume_id": vid, "node_id": node})
        return csi_pb2.ControllerPublishVolumeResponse()

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        vid = volume_id_argument(request.volume_id)
        node = node_id_argument(request.node_id) if request.node_id else ""
        with self._locks.hold(vid, "ControllerUnpublishVolume"):
            record = self._store.get(vid)
            if record is None or not record.published_nodes:
                return csi_pb2.ControllerUnpublishVolumeResponse()
            if node and node not in record.published_nodes:
                return csi_pb2.ControllerUnpublishVolumeResponse()
            # No node: from every node, as the spec says.
            gone = [node] if node else record.published_nodes
            self._store.update(
                record.replace(
                    published_node=None,
                    reader_nodes=tuple(n for n in record.reader_nodes if n not in gone),
                )
            )
        log.info("volume unpublished", extra={"volume_id": vid, "node_id": ",".join(gone)})
        return csi_pb2.ControllerUnpublishVolumeResponse()

    # -- queries -----------------------------------------------------------------

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        vid = volume_id_argument(request.volume_id)
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        record = self._store.get(vid)
        if record is None:
            raise NotFound(f"volume {vid} does not exist")

        problems = []
        for index, cap in enumerate(request.volume_capabilities):
            reason = unsupported_reason(cap) or read_only_many_conflict(
                [check_capability(cap, "")], record.read_only_many
            )
            if reason:
                problems.append(f"volume_capabilities[{index}]: {reason}")
        if request.volume_context and dict(request.volume_context) != dict(record.volume_context):
            problems.append("volume_context differs from the one the volume was created with")
        if request.parameters and request_parameters(request.parameters) != dict(
            record.request_parameters
        ):
            problems.append("parameters differ from the ones the volume was created with")
        if request.mutable_parameters:
            problems.append("mutable_parameters are not supported")
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=dict(request.volume_context),
                volume_capabilities=list(request.volume_capabilities),
                parameters=dict(request.parameters),
            )
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        start = listing_start(request.starting_token) if request.starting_token else ""
        records = [r for r in self._store.list() if r.volume_id > start]
        page = records[: request.max_entries] if request.max_entries else records
        Entry = csi_pb2.ListVolumesResponse.Entry
        return csi_pb2.ListVolumesResponse(
            entries=[
                Entry(
                    volume=_volume_message(record),
                    status=csi_pb2.ListVolumesResponse.VolumeStatus(
                        published_node_ids=record.published_nodes
                    ),
                )
                for record in page
            ],
            next_token=LIST_TOKEN_PREFIX + page[-1].volume_id if len(page) < len(records) else "",
        )

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetVolumeResponse:
        vid = volume_id_argument(request.volume_id)
        record = self._store.get(vid)
        if record is None:
            raise NotFound(f"volume {vid} does not exist")
        return csi_pb2.ControllerGetVolumeResponse(
            volume=_volume_message(record),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=record.published_nodes
            ),
        )

    # -- expand ------------------------------------------------------------------

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        vid = volume_id_argument(request.volume_id)
        if request.capacity_range.required_bytes <= 0:
            raise InvalidArgument("capacity_range.required_bytes is required and must be positive")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability, "volume_capability")
        limit = request.capacity_range.limit_bytes
        wanted = capacity_for(request.capacity_range)
        with self._locks.hold(vid, "ControllerExpandVolume"):
            record = self._store.get(vid)
            if record is None:
                raise NotFound(f"volume {vid} does not exist")
            if limit and record.capacity_bytes > limit:
                raise OutOfRange(
                    f"volume {vid} already has {record.capacity_bytes} bytes, more than "
                    f"limit_bytes ({limit}); volumes never shrink"
                )
            if wanted > record.capacity_bytes:
                record = self._store.update(record.replace(capacity_bytes=wanted))
                log.info("volume expanded", extra={"volume_id": vid, "capacity_bytes": wanted})
        # The node grows the export and the filesystem (NodeExpandVolume); asked for again
        # when the size was already recorded, since a CO retry may follow a lost node step.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity_bytes, node_expansion_required=True
        )

    # -- snapshots (snapshots.py) --------------------------------------------------

    def _snapshot_rpcs(self, name: str) -> SnapshotRpcs:
        if self._snapshots is None:
            raise Unimplemented(f"Controller.{name} is not supported by this controller's backend")
        return self._snapshots

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        return self._snapshot_rpcs("CreateSnapshot").CreateSnapshot(request, context)

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        return self._snapshot_rpcs("DeleteSnapshot").DeleteSnapshot(request, context)

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        return self._snapshot_rpcs("ListSnapshots").ListSnapshots(request, context)

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetSnapshotResponse:
        return self._snapshot_rpcs("GetSnapshot").GetSnapshot(request, context)


answer_unimplemented(ControllerService, csi_pb2_grpc.ControllerServicer, "Controller")
