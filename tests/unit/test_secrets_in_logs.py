"""Secrets sent through every RPC that carries them never reach the log or the caller."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from zerofs_csi.cli import parse_config
from zerofs_csi.config import LogFormat
from zerofs_csi.csi import csi_pb2
from zerofs_csi.observability import logs as logsetup
from zerofs_csi.server import Plugin, build

# Besides plain values, the characters an encoding escapes: a quote and a backslash (JSON
# writes them \" and \\), non-ASCII letters (\u00e4), a newline, a tab and an escape.
SECRETS = {
    "ZEROFS_ENCRYPTION_PASSWORD": 'Enc"Pass\\word-that-must-not-leak',
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYNOLEAK",
    "AWS_SECRET_ACCESS_KEY": "pässwörd99/Access+Key-that-must-not-leak",
    "AWS_SESSION_TOKEN": "session\ntoken\tthat\x1b[0m-must-not-leak",
    "ZEROFS_PLAIN_EXTRA": "enc-Pa55word-that-must-not-leak",
}
CAPABILITY = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def _secret_rpcs() -> list[tuple[str, str]]:
    """Every (service, method) whose request has a field the spec marks csi_secret."""
    found = []
    for service in ("Controller", "Node"):
        for method in csi_pb2.DESCRIPTOR.services_by_name[service].methods:
            fields = method.input_type.fields
            if any(f.GetOptions().Extensions[csi_pb2.csi_secret] for f in fields):  # type: ignore[index]
                found.append((service, method.name))
    return found


def _request(service: str, method: str, tmp_path: Path) -> object:
    descriptor = csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    cls = getattr(csi_pb2, descriptor.input_type.name)
    request = cls()
    names = request.DESCRIPTOR.fields_by_name
    values = {
        "name": "pvc-1",
        "volume_id": "pvc-1",
        "node_id": "node-a",
        "snapshot_id": "snap-1",
        "source_volume_id": "pvc-1",
        "staging_target_path": str(tmp_path / "staging"),
        "target_path": str(tmp_path / "target"),
        "volume_path": str(tmp_path / "target"),
    }
    for field, value in values.items():
        if field in names:
            setattr(request, field, value)
    if "volume_capability" in names:
        request.volume_capability.CopyFrom(CAPABILITY)
    if "volume_capabilities" in names:
        request.volume_capabilities.append(CAPABILITY)
    if "capacity_range" in names:
        request.capacity_range.required_bytes = 1 << 30
    if "parameters" in names:
        request.parameters.update(
            {"storageUrl": f"file://{tmp_path}/store", "deleteDataOnPVCDelete": "false"}
        )
    if "volume_context" in names:
        request.volume_context.update(
            {"storageUrl": f"file://{tmp_path}/store", "capacityBytes": str(1 << 30)}
        )
    for field in request.DESCRIPTOR.fields:
        if field.GetOptions().Extensions[csi_pb2.csi_secret]:  # type: ignore[index]
            getattr(request, field.name).update(SECRETS)
    return request


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    config = parse_config(
        [
            "--role", "all", "--node-id", "node-a", "--backend", "local",
            "--endpoint", f"unix://{tmp_path}/csi.sock", "--metrics-address", "",
            "--state-dir", str(tmp_path / "state"), "--zerofs-command", "/bin/false",
        ]
    )  # fmt: skip
    plugin = build(config, checks=[])
    plugin.server.start()
    yield plugin
    plugin.server.stop(grace=None).wait()
    plugin.close()


def _decoded(output: str) -> str:
    """The JSON log lines of ``output`` decoded: every string value, unescaped."""
    values: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            values.append(str(value))

    for line in output.splitlines():
        if line.startswith("{"):
            walk(json.loads(line))
    return "\n".join(values)


@pytest.mark.parametrize("log_format", [LogFormat.JSON, LogFormat.TEXT])
def test_secrets_through_every_rpc_stay_out_of_logs_and_errors(
    plugin: Plugin, tmp_path: Path, capfd: pytest.CaptureFixture[str], log_format: LogFormat
) -> None:
    rpcs = _secret_rpcs()
    assert ("Controller", "CreateVolume") in rpcs and ("Node", "NodeStageVolume") in rpcs
    logsetup.configure("debug", log_format)
    details = []
    try:
        with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
            for service, method in rpcs:
                descriptor = csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
                response_cls = getattr(csi_pb2, descriptor.output_type.name)
                request = _request(service, method, tmp_path)
                call = channel.unary_unary(
                    f"/csi.v1.{service}/{method}",
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                try:
                    call(request, timeout=60)
                except grpc.RpcError as exc:
                    details.append(f"{method}: {exc.code().name} {exc.details()}")
        # A library that echoes a secret in its own message or in a field is masked too.
        library = logging.getLogger("botocore")
        for value in SECRETS.values():
            library.error("signature mismatch for %s", value)
            library.error("credentials refused", extra={"credentials": {"key": [value]}})
    finally:
        logging.getLogger().handlers.clear()
    output = capfd.readouterr()
    text = output.out + output.err + "\n".join(details)
    if log_format is LogFormat.JSON:
        text += _decoded(output.err)
        assert '"msg":"signature mismatch for ***stripped***"' in output.err
    assert "CreateVolume" in output.err and "NodeStageVolume" in output.err  # calls were logged
    assert "ZEROFS_ENCRYPTION_PASSWORD" in output.err and "***stripped***" in output.err
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked"
