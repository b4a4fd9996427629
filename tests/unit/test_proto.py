"""The generated CSI stubs are current and wire-compatible with CSI spec v1.12.0.

The expected values below are facts read from csi.proto of
github.com/container-storage-interface/spec at tag v1.12.0: field numbers and
types, enum numbers, RPC names and streaming, and which fields carry csi_secret.
A mismatch means kubelet or a sidecar would decode our messages differently.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "csi.v1"

SCALAR_TYPE_NAMES = {
    pb_descriptor.FieldDescriptor.TYPE_STRING: "string",
    pb_descriptor.FieldDescriptor.TYPE_INT64: "int64",
    pb_descriptor.FieldDescriptor.TYPE_INT32: "int32",
    pb_descriptor.FieldDescriptor.TYPE_BOOL: "bool",
}


def load_gen_proto() -> ModuleType:
    """Import tools/gen_proto.py, which is a script rather than a package module."""
    path = REPO_ROOT / "tools" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("gen_proto", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def message(name: str) -> pb_descriptor.Descriptor:
    return csi_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"{PACKAGE}.{name}")


def enum(name: str) -> pb_descriptor.EnumDescriptor:
    return csi_pb2.DESCRIPTOR.pool.FindEnumTypeByName(f"{PACKAGE}.{name}")


def strip_package(full_name: str) -> str:
    prefix = f"{PACKAGE}."
    return full_name[len(prefix) :] if full_name.startswith(prefix) else full_name


def field_shape(field: pb_descriptor.FieldDescriptor) -> str:
    """Spell a field's type the way the .proto does, e.g. ``repeated Topology``."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = field.message_type.fields_by_name["key"]
        value = field.message_type.fields_by_name["value"]
        return f"map<{field_shape(key)},{field_shape(value)}>"
    if field.message_type is not None:
        base = strip_package(field.message_type.full_name)
    elif field.enum_type is not None:
        base = strip_package(field.enum_type.full_name)
    else:
        base = SCALAR_TYPE_NAMES[field.type]
    return f"repeated {base}" if field.is_repeated else base


def option_is_set(options: Message, extension: pb_descriptor.FieldDescriptor) -> bool:
    """Whether a boolean custom option is present and true on an options message.

    Reads ListFields rather than ``Extensions[...]`` so the check does not share a code
    path with the secret stripping in zerofs_csi.sanitize.
    """
    return any(field is extension and value is True for field, value in options.ListFields())


# ------------------------------------------------------------ generation


def test_committed_stubs_match_proto() -> None:
    pytest.importorskip("grpc_tools")
    gen_proto = load_gen_proto()
    stale = gen_proto.check()
    summary = {name: "".join(diff[:20]) for name, diff in stale.items()}
    assert stale == {}, f"run `python tools/gen_proto.py`; stale stubs: {summary}"


def test_check_reports_a_modified_stub(tmp_path: Path) -> None:
    gen_proto = load_gen_proto()
    target = gen_proto.TARGETS[0]
    for name, path in target.outputs(tmp_path).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target.outputs(REPO_ROOT)[name], path)
    with target.outputs(tmp_path)["csi_pb2_grpc.py"].open("a", encoding="utf-8") as stub:
        stub.write("# edited by hand\n")
    stale = gen_proto.stale_files(target, tmp_path)
    assert list(stale) == ["csi_pb2_grpc.py"]
    assert "+# edited by hand\n" in stale["csi_pb2_grpc.py"]


def test_file_descriptor_identity() -> None:
    assert csi_pb2.DESCRIPTOR.package == PACKAGE
    assert csi_pb2.DESCRIPTOR.name == "zerofs_csi/csi/csi.proto"
    # The grpc module must import the package-qualified pb2, not a top-level csi_pb2.
    assert csi_pb2_grpc.zerofs__csi_dot_csi_dot_csi__pb2 is csi_pb2


# ---------------------------------------------------------------- fields

MESSAGE_FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "GetPluginInfoResponse": {
        "name": (1, "string"),
        "vendor_version": (2, "string"),
        "manifest": (3, "map<string,string>"),
    },
    "PluginCapability.Service": {"type": (1, "PluginCapability.Service.Type")},
    "PluginCapability.VolumeExpansion": {"type": (1, "PluginCapability.VolumeExpansion.Type")},
    "ProbeResponse": {"ready": (1, "google.protobuf.BoolValue")},
    "CreateVolumeRequest": {
        "name": (1, "string"),
        "capacity_range": (2, "CapacityRange"),
        "volume_capabilities": (3, "repeated VolumeCapability"),
        "parameters": (4, "map<string,string>"),
        "secrets": (5, "map<string,string>"),
        "volume_content_source": (6, "VolumeContentSource"),
        "accessibility_requirements": (7, "TopologyRequirement"),
        "mutable_parameters": (8, "map<string,string>"),
    },
    "CreateVolumeResponse": {"volume": (1, "Volume")},
    "VolumeContentSource": {
        "snapshot": (1, "VolumeContentSource.SnapshotSource"),
        "volume": (2, "VolumeContentSource.VolumeSource"),
    },
    "VolumeCapability": {
        "block": (1, "VolumeCapability.BlockVolume"),
        "mount": (2, "VolumeCapability.MountVolume"),
        "access_mode": (3, "VolumeCapability.AccessMode"),
    },
    "VolumeCapability.BlockVolume": {},
    "VolumeCapability.MountVolume": {
        "fs_type": (1, "string"),
        "mount_flags": (2, "repeated string"),
        "volume_mount_group": (3, "string"),
    },
    "VolumeCapability.AccessMode": {"mode": (1, "VolumeCapability.AccessMode.Mode")},
    "CapacityRange": {"required_bytes": (1, "int64"), "limit_bytes": (2, "int64")},
    "Volume": {
        "capacity_bytes": (1, "int64"),
        "volume_id": (2, "string"),
        "volume_context": (3, "map<string,string>"),
        "content_source": (4, "VolumeContentSource"),
        "accessible_topology": (5, "repeated Topology"),
    },
    "TopologyRequirement": {
        "requisite": (1, "repeated Topology"),
        "preferred": (2, "repeated Topology"),
    },
    "Topology": {"segments": (1, "map<string,string>")},
    "DeleteVolumeRequest": {"volume_id": (1, "string"), "secrets": (2, "map<string,string>")},
    "ControllerPublishVolumeRequest": {
        "volume_id": (1, "string"),
        "node_id": (2, "string"),
        "volume_capability": (3, "VolumeCapability"),
        "readonly": (4, "bool"),
        "secrets": (5, "map<string,string>"),
        "volume_context": (6, "map<string,string>"),
    },
    "ValidateVolumeCapabilitiesRequest": {
        "volume_id": (1, "string"),
        "volume_context": (2, "map<string,string>"),
        "volume_capabilities": (3, "repeated VolumeCapability"),
        "parameters": (4, "map<string,string>"),
        "secrets": (5, "map<string,string>"),
        "mutable_parameters": (6, "map<string,string>"),
    },
    "ValidateVolumeCapabilitiesResponse": {
        "confirmed": (1, "ValidateVolumeCapabilitiesResponse.Confirmed"),
        "message": (2, "string"),
    },
    "GetCapacityResponse": {
        "available_capacity": (1, "int64"),
        "maximum_volume_size": (2, "google.protobuf.Int64Value"),
        "minimum_volume_size": (3, "google.protobuf.Int64Value"),
    },
    "ControllerServiceCapability.RPC": {"type": (1, "ControllerServiceCapability.RPC.Type")},
    "ControllerExpandVolumeRequest": {
        "volume_id": (1, "string"),
        "capacity_range": (2, "CapacityRange"),
        "secrets": (3, "map<string,string>"),
        "volume_capability": (4, "VolumeCapability"),
    },
    "ControllerExpandVolumeResponse": {
        "capacity_bytes": (1, "int64"),
        "node_expansion_required": (2, "bool"),
    },
    "NodeStageVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, "map<string,string>"),
        "staging_target_path": (3, "string"),
        "volume_capability": (4, "VolumeCapability"),
        "secrets": (5, "map<string,string>"),
        "volume_context": (6, "map<string,string>"),
    },
    "NodeUnstageVolumeRequest": {
        "volume_id": (1, "string"),
        "staging_target_path": (2, "string"),
    },
    "NodePublishVolumeRequest": {
        "volume_id": (1, "string"),
        "publish_context": (2, "map<string,string>"),
        "staging_target_path": (3, "string"),
        "target_path": (4, "string"),
        "volume_capability": (5, "VolumeCapability"),
        "readonly": (6, "bool"),
        "secrets": (7, "map<string,string>"),
        "volume_context": (8, "map<string,string>"),
    },
    "NodeUnpublishVolumeRequest": {"volume_id": (1, "string"), "target_path": (2, "string")},
    "NodeGetVolumeStatsRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "staging_target_path": (3, "string"),
    },
    "NodeGetVolumeStatsResponse": {
        "usage": (1, "repeated VolumeUsage"),
        "volume_condition": (2, "VolumeCondition"),
    },
    "VolumeUsage": {
        "available": (1, "int64"),
        "total": (2, "int64"),
        "used": (3, "int64"),
        "unit": (4, "VolumeUsage.Unit"),
    },
    "VolumeCondition": {"abnormal": (1, "bool"), "message": (2, "string")},
    "NodeServiceCapability.RPC": {"type": (1, "NodeServiceCapability.RPC.Type")},
    "NodeGetInfoResponse": {
        "node_id": (1, "string"),
        "max_volumes_per_node": (2, "int64"),
        "accessible_topology": (3, "Topology"),
    },
    "NodeExpandVolumeRequest": {
        "volume_id": (1, "string"),
        "volume_path": (2, "string"),
        "capacity_range": (3, "CapacityRange"),
        "staging_target_path": (4, "string"),
        "volume_capability": (5, "VolumeCapability"),
        "secrets": (6, "map<string,string>"),
    },
    "NodeExpandVolumeResponse": {"capacity_bytes": (1, "int64")},
    "Snapshot": {
        "size_bytes": (1, "int64"),
        "snapshot_id": (2, "string"),
        "source_volume_id": (3, "string"),
        "creation_time": (4, "google.protobuf.Timestamp"),
        "ready_to_use": (5, "bool"),
        "group_snapshot_id": (6, "string"),
    },
}


@pytest.mark.parametrize("message_name", sorted(MESSAGE_FIELDS))
def test_message_fields_match_spec(message_name: str) -> None:
    descriptor = message(message_name)
    actual = {field.name: (field.number, field_shape(field)) for field in descriptor.fields}
    assert actual == MESSAGE_FIELDS[message_name]


ONEOFS: list[tuple[str, str, set[str]]] = [
    ("PluginCapability", "type", {"service", "volume_expansion"}),
    ("VolumeContentSource", "type", {"snapshot", "volume"}),
    ("VolumeCapability", "access_type", {"block", "mount"}),
    ("ControllerServiceCapability", "type", {"rpc"}),
    ("NodeServiceCapability", "type", {"rpc"}),
]


@pytest.mark.parametrize(("message_name", "oneof_name", "members"), ONEOFS)
def test_oneofs_match_spec(message_name: str, oneof_name: str, members: set[str]) -> None:
    oneof = message(message_name).oneofs_by_name[oneof_name]
    assert {field.name for field in oneof.fields} == members


def test_access_mode_is_outside_the_access_type_oneof() -> None:
    # Setting block or mount must not clear the access mode, and vice versa.
    capability = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    assert capability.WhichOneof("access_type") == "block"
    assert capability.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER


# ----------------------------------------------------------------- enums

ENUM_VALUES: dict[str, dict[str, int]] = {
    "VolumeCapability.AccessMode.Mode": {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    },
    "ControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "CREATE_DELETE_VOLUME": 1,
        "PUBLISH_UNPUBLISH_VOLUME": 2,
        "LIST_VOLUMES": 3,
        "GET_CAPACITY": 4,
        "CREATE_DELETE_SNAPSHOT": 5,
        "LIST_SNAPSHOTS": 6,
        "CLONE_VOLUME": 7,
        "PUBLISH_READONLY": 8,
        "EXPAND_VOLUME": 9,
        "LIST_VOLUMES_PUBLISHED_NODES": 10,
        "VOLUME_CONDITION": 11,
        "GET_VOLUME": 12,
        "SINGLE_NODE_MULTI_WRITER": 13,
        "MODIFY_VOLUME": 14,
        "GET_SNAPSHOT": 15,
    },
    "NodeServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    },
    "PluginCapability.Service.Type": {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    },
    "PluginCapability.VolumeExpansion.Type": {"UNKNOWN": 0, "ONLINE": 1, "OFFLINE": 2},
    "VolumeUsage.Unit": {"UNKNOWN": 0, "BYTES": 1, "INODES": 2},
    "GroupControllerServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT": 1,
    },
    "BlockMetadataType": {"UNKNOWN": 0, "FIXED_LENGTH": 1, "VARIABLE_LENGTH": 2},
}


@pytest.mark.parametrize("enum_name", sorted(ENUM_VALUES))
def test_enum_values_match_spec(enum_name: str) -> None:
    actual = {value.name: value.number for value in enum(enum_name).values}
    assert actual == ENUM_VALUES[enum_name]


# -------------------------------------------------------------- services

# (service, method, request, response, server streams)
RPCS: list[tuple[str, str, str, str, bool]] = [
    ("Identity", "GetPluginInfo", "GetPluginInfoRequest", "GetPluginInfoResponse", False),
    (
        "Identity",
        "GetPluginCapabilities",
        "GetPluginCapabilitiesRequest",
        "GetPluginCapabilitiesResponse",
        False,
    ),
    ("Identity", "Probe", "ProbeRequest", "ProbeResponse", False),
    ("Controller", "CreateVolume", "CreateVolumeRequest", "CreateVolumeResponse", False),
    ("Controller", "DeleteVolume", "DeleteVolumeRequest", "DeleteVolumeResponse", False),
    (
        "Controller",
        "ControllerPublishVolume",
        "ControllerPublishVolumeRequest",
        "ControllerPublishVolumeResponse",
        False,
    ),
    (
        "Controller",
        "ControllerUnpublishVolume",
        "ControllerUnpublishVolumeRequest",
        "ControllerUnpublishVolumeResponse",
        False,
    ),
    (
        "Controller",
        "ValidateVolumeCapabilities",
        "ValidateVolumeCapabilitiesRequest",
        "ValidateVolumeCapabilitiesResponse",
        False,
    ),
    ("Controller", "ListVolumes", "ListVolumesRequest", "ListVolumesResponse", False),
    ("Controller", "GetCapacity", "GetCapacityRequest", "GetCapacityResponse", False),
    (
        "Controller",
        "ControllerGetCapabilities",
        "ControllerGetCapabilitiesRequest",
        "ControllerGetCapabilitiesResponse",
        False,
    ),
    ("Controller", "CreateSnapshot", "CreateSnapshotRequest", "CreateSnapshotResponse", False),
    ("Controller", "DeleteSnapshot", "DeleteSnapshotRequest", "DeleteSnapshotResponse", False),
    ("Controller", "ListSnapshots", "ListSnapshotsRequest", "ListSnapshotsResponse", False),
    ("Controller", "GetSnapshot", "GetSnapshotRequest", "GetSnapshotResponse", False),
    (
        "Controller",
        "ControllerExpandVolume",
        "ControllerExpandVolumeRequest",
        "ControllerExpandVolumeResponse",
        False,
    ),
    (
        "Controller",
        "ControllerGetVolume",
        "ControllerGetVolumeRequest",
        "ControllerGetVolumeResponse",
        False,
    ),
    (
        "Controller",
        "ControllerModifyVolume",
        "ControllerModifyVolumeRequest",
        "ControllerModifyVolumeResponse",
        False,
    ),
    (
        "GroupController",
        "GroupControllerGetCapabilities",
        "GroupControllerGetCapabilitiesRequest",
        "GroupControllerGetCapabilitiesResponse",
        False,
    ),
    (
        "GroupController",
        "CreateVolumeGroupSnapshot",
        "CreateVolumeGroupSnapshotRequest",
        "CreateVolumeGroupSnapshotResponse",
        False,
    ),
    (
        "GroupController",
        "DeleteVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshotRequest",
        "DeleteVolumeGroupSnapshotResponse",
        False,
    ),
    (
        "GroupController",
        "GetVolumeGroupSnapshot",
        "GetVolumeGroupSnapshotRequest",
        "GetVolumeGroupSnapshotResponse",
        False,
    ),
    (
        "SnapshotMetadata",
        "GetMetadataAllocated",
        "GetMetadataAllocatedRequest",
        "GetMetadataAllocatedResponse",
        True,
    ),
    (
        "SnapshotMetadata",
        "GetMetadataDelta",
        "GetMetadataDeltaRequest",
        "GetMetadataDeltaResponse",
        True,
    ),
    ("Node", "NodeStageVolume", "NodeStageVolumeRequest", "NodeStageVolumeResponse", False),
    ("Node", "NodeUnstageVolume", "NodeUnstageVolumeRequest", "NodeUnstageVolumeResponse", False),
    ("Node", "NodePublishVolume", "NodePublishVolumeRequest", "NodePublishVolumeResponse", False),
    (
        "Node",
        "NodeUnpublishVolume",
        "NodeUnpublishVolumeRequest",
        "NodeUnpublishVolumeResponse",
        False,
    ),
    (
        "Node",
        "NodeGetVolumeStats",
        "NodeGetVolumeStatsRequest",
        "NodeGetVolumeStatsResponse",
        False,
    ),
    ("Node", "NodeExpandVolume", "NodeExpandVolumeRequest", "NodeExpandVolumeResponse", False),
    (
        "Node",
        "NodeGetCapabilities",
        "NodeGetCapabilitiesRequest",
        "NodeGetCapabilitiesResponse",
        False,
    ),
    ("Node", "NodeGetInfo", "NodeGetInfoRequest", "NodeGetInfoResponse", False),
]


@pytest.mark.parametrize(
    ("service", "method", "request_type", "response_type", "server_streaming"), RPCS
)
def test_rpc_matches_spec(
    service: str, method: str, request_type: str, response_type: str, server_streaming: bool
) -> None:
    descriptor = csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert descriptor.input_type.full_name == f"{PACKAGE}.{request_type}"
    assert descriptor.output_type.full_name == f"{PACKAGE}.{response_type}"
    assert descriptor.client_streaming is False
    assert descriptor.server_streaming is server_streaming
    # The generated stub and servicer expose the method under the same name.
    assert hasattr(getattr(csi_pb2_grpc, f"{service}Servicer"), method)


def test_services_define_no_rpcs_beyond_spec() -> None:
    expected = {(service, method) for service, method, *_ in RPCS}
    actual = {
        (service.name, method.name)
        for service in csi_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert actual == expected


class PluginInfoServicer(csi_pb2_grpc.IdentityServicer):
    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name="zerofs.csi.test", vendor_version="1")


class AllocatedBlocksServicer(csi_pb2_grpc.SnapshotMetadataServicer):
    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        for offset in (0, 4096):
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=csi_pb2.FIXED_LENGTH,
                block_metadata=[csi_pb2.BlockMetadata(byte_offset=offset, size_bytes=4096)],
            )


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    """A real gRPC server on loopback serving the generated servicers."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    csi_pb2_grpc.add_IdentityServicer_to_server(PluginInfoServicer(), server)
    csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(AllocatedBlocksServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as client_channel:
            yield client_channel
    finally:
        server.stop(grace=None)


def test_unary_call_through_generated_stub(channel: grpc.Channel) -> None:
    reply = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
        csi_pb2.GetPluginInfoRequest(), timeout=10
    )
    assert (reply.name, reply.vendor_version) == ("zerofs.csi.test", "1")


def test_streaming_call_through_generated_stub(channel: grpc.Channel) -> None:
    replies = csi_pb2_grpc.SnapshotMetadataStub(channel).GetMetadataAllocated(
        csi_pb2.GetMetadataAllocatedRequest(snapshot_id="snap"), timeout=10
    )
    offsets = [block.byte_offset for reply in replies for block in reply.block_metadata]
    assert offsets == [0, 4096]


# --------------------------------------------------------------- options

EXTENSIONS: list[tuple[Any, str, int]] = [
    (csi_pb2.csi_secret, "google.protobuf.FieldOptions", 1059),
    (csi_pb2.alpha_field, "google.protobuf.FieldOptions", 1060),
    (csi_pb2.alpha_enum, "google.protobuf.EnumOptions", 1060),
    (csi_pb2.alpha_enum_value, "google.protobuf.EnumValueOptions", 1060),
    (csi_pb2.alpha_message, "google.protobuf.MessageOptions", 1060),
    (csi_pb2.alpha_method, "google.protobuf.MethodOptions", 1060),
    (csi_pb2.alpha_service, "google.protobuf.ServiceOptions", 1060),
]


@pytest.mark.parametrize(("extension", "extendee", "number"), EXTENSIONS)
def test_custom_option_numbers_match_spec(
    extension: pb_descriptor.FieldDescriptor, extendee: str, number: int
) -> None:
    assert extension.containing_type is not None
    assert extension.containing_type.full_name == extendee
    assert extension.number == number
    assert extension.type == pb_descriptor.FieldDescriptor.TYPE_BOOL


# Every field the spec marks (csi_secret) = true; all are map<string,string> secrets.
SECRET_FIELDS = sorted(
    f"{name}.secrets"
    for name in (
        "CreateVolumeRequest",
        "DeleteVolumeRequest",
        "ControllerPublishVolumeRequest",
        "ControllerUnpublishVolumeRequest",
        "ValidateVolumeCapabilitiesRequest",
        "ControllerModifyVolumeRequest",
        "CreateSnapshotRequest",
        "DeleteSnapshotRequest",
        "ListSnapshotsRequest",
        "GetSnapshotRequest",
        "ControllerExpandVolumeRequest",
        "NodeStageVolumeRequest",
        "NodePublishVolumeRequest",
        "NodeExpandVolumeRequest",
        "CreateVolumeGroupSnapshotRequest",
        "DeleteVolumeGroupSnapshotRequest",
        "GetVolumeGroupSnapshotRequest",
        "GetMetadataAllocatedRequest",
        "GetMetadataDeltaRequest",
    )
)


def all_messages() -> Iterator[pb_descriptor.Descriptor]:
    pending = list(csi_pb2.DESCRIPTOR.message_types_by_name.values())
    while pending:
        descriptor = pending.pop()
        yield descriptor
        pending.extend(descriptor.nested_types)


@pytest.mark.parametrize("field_path", SECRET_FIELDS)
def test_secret_field_carries_csi_secret(field_path: str) -> None:
    message_name, field_name = field_path.rsplit(".", 1)
    field = message(message_name).fields_by_name[field_name]
    assert option_is_set(field.GetOptions(), csi_pb2.csi_secret)
    assert field_shape(field) == "map<string,string>"


def test_only_spec_secret_fields_carry_csi_secret() -> None:
    flagged = sorted(
        f"{strip_package(descriptor.full_name)}.{field.name}"
        for descriptor in all_messages()
        for field in descriptor.fields
        if option_is_set(field.GetOptions(), csi_pb2.csi_secret)
    )
    assert flagged == SECRET_FIELDS


ALPHA_MARKERS: list[tuple[str, str]] = [
    ("field", "NodeGetVolumeStatsResponse.volume_condition"),
    ("field", "NodeExpandVolumeRequest.secrets"),
    ("field", "GetCapacityResponse.minimum_volume_size"),
    ("field", "ListVolumesResponse.VolumeStatus.volume_condition"),
    ("message", "VolumeCondition"),
    ("message", "ControllerGetVolumeRequest"),
    ("message", "GetSnapshotRequest"),
    ("method", "Controller.ControllerGetVolume"),
    ("method", "Controller.GetSnapshot"),
    ("service", "SnapshotMetadata"),
    ("enum_value", "VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER"),
    ("enum_value", "NodeServiceCapability.RPC.Type.VOLUME_CONDITION"),
    ("enum_value", "PluginCapability.Service.Type.SNAPSHOT_METADATA_SERVICE"),
]


@pytest.mark.parametrize(("kind", "path"), ALPHA_MARKERS)
def test_alpha_markers_match_spec(kind: str, path: str) -> None:
    owner, _, leaf = path.rpartition(".")
    options: Message
    if kind == "field":
        options = message(owner).fields_by_name[leaf].GetOptions()
        marker = csi_pb2.alpha_field
    elif kind == "message":
        options = message(path).GetOptions()
        marker = csi_pb2.alpha_message
    elif kind == "method":
        service = csi_pb2.DESCRIPTOR.services_by_name[owner]
        options = service.methods_by_name[leaf].GetOptions()
        marker = csi_pb2.alpha_method
    elif kind == "service":
        options = csi_pb2.DESCRIPTOR.services_by_name[path].GetOptions()
        marker = csi_pb2.alpha_service
    else:
        options = enum(owner).values_by_name[leaf].GetOptions()
        marker = csi_pb2.alpha_enum_value
    assert option_is_set(options, marker)


# ------------------------------------------------------------ wire bytes

# Hand-encoded per the protobuf wire format: tag = (field number << 3) | wire type.
GOLDEN_ENCODINGS: list[tuple[str, Any, bytes]] = [
    (
        "NodeStageVolumeRequest.staging_target_path",
        csi_pb2.NodeStageVolumeRequest(staging_target_path="/s"),
        b"\x1a\x02/s",
    ),
    (
        "NodePublishVolumeRequest.readonly",
        csi_pb2.NodePublishVolumeRequest(readonly=True),
        b"\x30\x01",
    ),
    (
        "CreateVolumeRequest.capacity_range.required_bytes",
        csi_pb2.CreateVolumeRequest(capacity_range=csi_pb2.CapacityRange(required_bytes=1)),
        b"\x12\x02\x08\x01",
    ),
    (
        "VolumeCapability.access_mode.mode",
        csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            )
        ),
        b"\x1a\x02\x08\x01",
    ),
    (
        "NodeStageVolumeRequest.secrets",
        csi_pb2.NodeStageVolumeRequest(secrets={"k": "v"}),
        b"\x2a\x06\x0a\x01k\x12\x01v",
    ),
]


@pytest.mark.parametrize(
    ("encoded_message", "expected"),
    [(case[1], case[2]) for case in GOLDEN_ENCODINGS],
    ids=[case[0] for case in GOLDEN_ENCODINGS],
)
def test_wire_encoding(encoded_message: Any, expected: bytes) -> None:
    assert encoded_message.SerializeToString() == expected
    assert type(encoded_message).FromString(expected) == encoded_message
