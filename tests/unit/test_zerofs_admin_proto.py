"""The generated ZeroFS admin stubs speak ZeroFS 2.3's admin service.

The expected values are facts read from zerofs/proto/admin.proto of Barre/ZeroFS at tag
v2.3.0: the package and service, the request and response types of the methods the
driver calls, and every field's number and type. A mismatch means ZeroFS would decode
the driver's calls differently. The stand-in builds its messages from the descriptor set
gen_proto writes beside it, which must describe the same file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import descriptor_pb2

from zerofs_csi.zerofs_admin import admin_pb2, admin_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "zerofs.admin"
SERVICE = "AdminService"

TYPE_NAMES = {
    pb_descriptor.FieldDescriptor.TYPE_STRING: "string",
    pb_descriptor.FieldDescriptor.TYPE_MESSAGE: "message",
}

# message -> field -> (number, type, repeated)
FIELDS: dict[str, dict[str, tuple[int, str, bool]]] = {
    "CheckpointInfo": {
        "id": (1, "string", False),
        "name": (2, "string", False),
        "created_at": (3, "google.protobuf.Timestamp", False),
    },
    "CreateCheckpointRequest": {"name": (1, "string", False)},
    "CreateCheckpointResponse": {"checkpoint": (1, "zerofs.admin.CheckpointInfo", False)},
    "ListCheckpointsRequest": {},
    "ListCheckpointsResponse": {"checkpoints": (1, "zerofs.admin.CheckpointInfo", True)},
    "DeleteCheckpointRequest": {"name": (1, "string", False)},
    "DeleteCheckpointResponse": {},
    "GetCheckpointInfoRequest": {"name": (1, "string", False)},
    "GetCheckpointInfoResponse": {"checkpoint": (1, "zerofs.admin.CheckpointInfo", False)},
    "FlushRequest": {},
    "FlushResponse": {},
}

METHODS = {
    "CreateCheckpoint": ("CreateCheckpointRequest", "CreateCheckpointResponse"),
    "ListCheckpoints": ("ListCheckpointsRequest", "ListCheckpointsResponse"),
    "DeleteCheckpoint": ("DeleteCheckpointRequest", "DeleteCheckpointResponse"),
    "GetCheckpointInfo": ("GetCheckpointInfoRequest", "GetCheckpointInfoResponse"),
    "Flush": ("FlushRequest", "FlushResponse"),
}


def shape(field: pb_descriptor.FieldDescriptor) -> tuple[int, str, bool]:
    kind = field.message_type.full_name if field.message_type else TYPE_NAMES[field.type]
    return (field.number, kind, field.is_repeated)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_message_fields_match_zerofs(name: str) -> None:
    descriptor = admin_pb2.DESCRIPTOR.message_types_by_name[name]
    assert {f.name: shape(f) for f in descriptor.fields} == FIELDS[name]


def test_messages_are_exactly_those_of_the_methods() -> None:
    assert set(admin_pb2.DESCRIPTOR.message_types_by_name) == set(FIELDS)


def test_service_methods_match_zerofs() -> None:
    assert admin_pb2.DESCRIPTOR.package == PACKAGE
    service = admin_pb2.DESCRIPTOR.services_by_name[SERVICE]
    assert service.full_name == f"{PACKAGE}.{SERVICE}"
    found = {
        m.name: (m.input_type.name, m.output_type.name)
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    }
    assert found == METHODS
    assert len(service.methods) == len(METHODS)
    for method in METHODS:
        assert hasattr(admin_pb2_grpc.AdminServiceServicer, method)


def test_wire_encoding() -> None:
    # Hand-encoded: tag = (field number << 3) | wire type 2 (length-delimited).
    request = admin_pb2.CreateCheckpointRequest(name="s1")
    assert request.SerializeToString() == b"\x0a\x02s1"
    info = admin_pb2.CheckpointInfo(id="u", name="n")
    info.created_at.seconds = 1
    assert info.SerializeToString() == b"\x0a\x01u\x12\x01n\x1a\x02\x08\x01"


def test_standin_descriptor_set_describes_the_same_file() -> None:
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(
        (REPO_ROOT / "tools" / "zerofs_standin_admin.pb").read_bytes()
    )
    by_name = {f.name: f for f in descriptors.file}
    assert "google/protobuf/timestamp.proto" in by_name
    generated = descriptor_pb2.FileDescriptorProto()
    admin_pb2.DESCRIPTOR.CopyToProto(generated)
    standin = by_name[admin_pb2.DESCRIPTOR.name]
    # protoc writes each field's JSON name into the set; CopyToProto leaves it out.
    for message in standin.message_type:
        for field in message.field:
            field.ClearField("json_name")
    assert standin == generated
