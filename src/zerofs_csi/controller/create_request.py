"""What a CreateVolume asks for, checked before the volume's lock is taken: its id (from
the name), capabilities, size, settings (StorageClass parameters, with a
``configMapName`` read through a ``ConfigMapReader``), and the provisioner secret that
``deleteDataOnPVCDelete`` will need; and whether a volume that exists already answers
the same request again (ALREADY_EXISTS otherwise)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from zerofs_csi.controller.arguments import capacity_fits, capacity_for, request_parameters
from zerofs_csi.controller.store import VolumeRecord
from zerofs_csi.csi import csi_pb2
from zerofs_csi.errors import AlreadyExists, InvalidArgument
from zerofs_csi.host import filesystems
from zerofs_csi.volume.capabilities import check_capability, read_only_many_conflict
from zerofs_csi.volume.id import volume_id_for_name
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import (
    CONFIG_MAP_PARAMETER,
    VolumeSettings,
    config_map_name,
    parse_volume_settings,
)

log = logging.getLogger(__name__)

# name -> data of a ConfigMap named by ``configMapName``.
ConfigMapReader = Callable[[str], Mapping[str, str]]


def config_maps_unavailable(name: str) -> Mapping[str, str]:
    """The ConfigMap reader without Kubernetes: every ``configMapName`` is refused."""
    raise InvalidArgument(
        f"StorageClass parameter {CONFIG_MAP_PARAMETER!r} ({name!r}) needs the Kubernetes "
        "API, and this controller runs without it (--backend local): put the settings in "
        "the parameters instead"
    )


@dataclass(frozen=True)
class CreateRequest:
    name: str
    volume_id: str
    capacity_range: csi_pb2.CapacityRange | None
    capacity_bytes: int
    settings: VolumeSettings
    # The parameters that define the volume, to tell a repeated request from another.
    parameters: dict[str, str]
    # The snapshot or volume the volume's data comes from (volume_content_source), if any.
    source_snapshot_id: str = ""
    source_volume_id: str = ""
    # MULTI_NODE_READER_ONLY: read-only servers on any number of nodes, never written.
    read_only_many: bool = False

    @property
    def has_source(self) -> bool:
        return bool(self.source_snapshot_id or self.source_volume_id)


def volume_settings(
    parameters: Mapping[str, str], read_config_map: ConfigMapReader
) -> VolumeSettings:
    cm_name = config_map_name(parameters)
    config_map_data = read_config_map(cm_name) if cm_name is not None else None
    settings = parse_volume_settings(parameters, config_map_data)
    if settings.ignored_legacy_keys:
        log.warning(
            "ConfigMap %s keys have no effect with this driver: %s",
            cm_name,
            ", ".join(settings.ignored_legacy_keys),
        )
    return settings


def create_request(
    request: csi_pb2.CreateVolumeRequest, read_config_map: ConfigMapReader
) -> CreateRequest:
    name = request.name
    vid = volume_id_for_name(name)
    if not request.volume_capabilities:
        raise InvalidArgument("volume_capabilities is required")
    checked = [
        check_capability(cap, f"volume_capabilities[{index}]")
        for index, cap in enumerate(request.volume_capabilities)
    ]
    capacity_range = request.capacity_range if request.HasField("capacity_range") else None
    capacity = capacity_for(capacity_range)
    source_snapshot_id = source_volume_id = ""
    if request.HasField("volume_content_source"):
        source = request.volume_content_source
        kind = source.WhichOneof("type")
        if kind == "snapshot":
            source_snapshot_id = source.snapshot.snapshot_id
        elif kind == "volume":
            source_volume_id = source.volume.volume_id
        if not (source_snapshot_id or source_volume_id):
            raise InvalidArgument("volume_content_source: a snapshot_id or volume_id is required")
    if request.mutable_parameters:
        raise InvalidArgument(
            "mutable_parameters are not supported: this driver does not modify volumes"
        )
    read_only_many = any(cap.many_readers for cap in checked)
    if read_only_many:
        conflict = read_only_many_conflict(checked, read_only_many)
        if conflict:
            raise InvalidArgument(f"volume_capabilities: {conflict}")
        if not (source_snapshot_id or source_volume_id):
            raise InvalidArgument(
                "a MULTI_NODE_READER_ONLY (ReadOnlyMany) volume is never written, so its data "
                "must come from a snapshot or a volume: give it a volume_content_source (a "
                "claim's dataSource)"
            )
    settings = volume_settings(request.parameters, read_config_map)
    for cap in checked:
        if cap.access_type == "mount":
            filesystems.check_capacity(cap.fs_type or settings.filesystem, capacity)
    if settings.delete_data_on_pvc_delete:
        # DeleteVolume will need these; a StorageClass without them would leave
        # volumes that can never be deleted, so refuse it now.
        try:
            VolumeSecrets.from_csi_secrets(request.secrets)
        except InvalidArgument as exc:
            raise InvalidArgument(
                "deleteDataOnPVCDelete needs the provisioner secret "
                "(csi.storage.k8s.io/provisioner-secret-name and -namespace): " + exc.message
            ) from None
    return CreateRequest(
        name=name,
        volume_id=vid,
        capacity_range=capacity_range,
        capacity_bytes=capacity,
        settings=settings,
        parameters=request_parameters(request.parameters),
        source_snapshot_id=source_snapshot_id,
        source_volume_id=source_volume_id,
        read_only_many=read_only_many,
    )


def check_compatible(existing: VolumeRecord, wanted: CreateRequest) -> None:
    """ALREADY_EXISTS unless ``existing`` is what ``wanted`` would have created."""
    vid = existing.volume_id
    name, capacity_range, parameters = wanted.name, wanted.capacity_range, wanted.parameters
    if existing.name != name:
        # Only a name spelling out another name's derived id gets here.
        raise AlreadyExists(
            f"volume id {vid}, which the name {name!r} maps to, belongs to the volume "
            f"named {existing.name!r}: choose another name"
        )
    if not capacity_fits(existing.capacity_bytes, capacity_range):
        assert capacity_range is not None
        raise AlreadyExists(
            f"volume {vid} exists with {existing.capacity_bytes} bytes, outside the "
            f"requested range (required {capacity_range.required_bytes}, limit "
            f"{capacity_range.limit_bytes or 'none'})"
        )
    if existing.read_only_many != wanted.read_only_many:
        raise AlreadyExists(
            f"volume {vid} exists "
            + ("MULTI_NODE_READER_ONLY" if existing.read_only_many else "for a writer")
            + ", which this request's capabilities do not ask for"
        )
    existing_source = (existing.source_snapshot_id, existing.source_volume_id)
    if existing_source != (wanted.source_snapshot_id, wanted.source_volume_id):
        raise AlreadyExists(
            f"volume {vid} exists with another content source "
            f"({existing.source_snapshot_id or existing.source_volume_id or 'none'})"
        )
    if dict(existing.request_parameters) != dict(parameters):
        differing = sorted(
            key
            for key in set(existing.request_parameters) | set(parameters)
            if existing.request_parameters.get(key) != parameters.get(key)
        )
        raise AlreadyExists(
            f"volume {vid} exists with other parameters (differing: {', '.join(differing)})"
        )
