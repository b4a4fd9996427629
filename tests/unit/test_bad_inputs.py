"""Bad input, one table per RPC and one for the flags: every row is a malformed or
hostile value sent to the real plugin over its gRPC socket (controller and node roles,
local backend) or given to the real CLI as a subprocess, with the answer it must get:
the gRPC code and words of the error, or one line on stderr and exit status 2.

A refused call leaves nothing behind: no volume record, no staging directory. When a
parameter, request field or flag is added, add its bad values here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from zerofs_csi.cli import parse_config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.server import Plugin, build

Mode = csi_pb2.VolumeCapability.AccessMode
Code = grpc.StatusCode
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
INVALID = Code.INVALID_ARGUMENT
STORAGE_URL = "s3://bucket/volumes"
SECRETS = {"ZEROFS_ENCRYPTION_PASSWORD": "pw-bad-inputs-test"}


def mount(fs_type: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
    )


def block() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
    )


@dataclass(frozen=True)
class Row:
    """One bad request: what is sent and the answer it must get."""

    case: str
    fields: dict[str, Any]
    code: Code
    words: tuple[str, ...]
    parameters: dict[str, str] = field(default_factory=dict)


def row(
    case: str, code: Code, *words: str, parameters: dict[str, str] | None = None, **fields: Any
) -> Row:
    return Row(case, fields, code, words, parameters or {})


# ----------------------------------------------------------------------- CreateVolume
# Each row starts from a valid request (one ext4 mount capability, 1 GiB, storageUrl);
# ``parameters`` are merged into the valid ones, ``fields`` replace request fields.

CREATE_VOLUME = [
    row("empty name", INVALID, "name is required", name=""),
    row("NUL in name", INVALID, "U+0000", name="pvc\x00x"),
    row("unknown parameter", INVALID, "unknown StorageClass parameter 'fsType'",
        parameters={"fsType": "ext4"}),
    row("path escape in storageUrl", INVALID, "'storageUrl'",
        parameters={"storageUrl": "s3://bucket/../x"}),
    row("two dots in the bucket", INVALID, "'storageUrl'", parameters={"storageUrl": "s3://a..b/x"}),
    row("s3Endpoint port out of range", INVALID, "'s3Endpoint'",
        parameters={"s3Endpoint": "https://h:99999"}),
    row("s3Endpoint unclosed IPv6 bracket", INVALID, "'s3Endpoint'",
        parameters={"s3Endpoint": "https://["}),
    # urlsplit drops TAB and newline before parsing; the raw value would reach ZeroFS.
    row("TAB inside the s3Endpoint host", INVALID, "'s3Endpoint'",
        parameters={"s3Endpoint": "https://s3.exa\tmple.com"}),
    row("newline inside the s3Endpoint host", INVALID, "'s3Endpoint'",
        parameters={"s3Endpoint": "https://s3.exa\nmple.com"}),
    row("memory:// loses the data at every server restart", INVALID, "'storageUrl'", "memory://",
        parameters={"storageUrl": "memory://"}),
    row("l0MaxSsts of 5000 digits", INVALID, "'l0MaxSsts'", "from 4 to 100000",
        parameters={"l0MaxSsts": "9" * 5000}),
    row("nbdConnections of 5000 digits", INVALID, "'nbdConnections'",
        parameters={"nbdConnections": "1" * 5000}),
    row("cpuRequest whose exponent overflows a decimal", INVALID, "'cpuRequest'",
        parameters={"cpuRequest": "1e999999999999"}),
    row("cpuRequest with a 5000-digit exponent", INVALID, "'cpuRequest'",
        parameters={"cpuRequest": "1e" + "9" * 5000}),
    row("memoryLimit of 5000 digits", INVALID, "'memoryLimit'",
        parameters={"memoryLimit": "9" * 5000}),
    row("memoryRequest beyond the largest Kubernetes quantity", INVALID, "'memoryRequest'",
        parameters={"memoryRequest": "9Ei"}),
    row("cpuLimit that is not a number", INVALID, "'cpuLimit'", parameters={"cpuLimit": "NaN"}),
    row("cpuRequest that is infinite", INVALID, "'cpuRequest'",
        parameters={"cpuRequest": "Infinity"}),
    row("cpuRequest above cpuLimit", INVALID, "'cpuRequest'", "greater than 'cpuLimit'",
        parameters={"cpuRequest": "2", "cpuLimit": "1500m"}),
    # Below what the filesystem can be made on, the node could never stage the volume.
    row("4 KiB of ext4", Code.OUT_OF_RANGE, "ext4", "at least 8388608 bytes",
        capacity_range=csi_pb2.CapacityRange(required_bytes=4 * KiB)),
    row("100 MiB of xfs", Code.OUT_OF_RANGE, "xfs", "at least 314572800 bytes",
        parameters={"filesystem": "xfs"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=100 * MiB)),
    row("100 MiB of btrfs", Code.OUT_OF_RANGE, "btrfs", "at least 114294784 bytes",
        parameters={"filesystem": "btrfs"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=100 * MiB)),
    row("the capability's filesystem, not the class's, sets the minimum", Code.OUT_OF_RANGE,
        "xfs", capacity_range=csi_pb2.CapacityRange(required_bytes=200 * MiB),
        volume_capabilities=[block(), mount("xfs")]),
    row("negative capacity", INVALID, "must not be negative",
        capacity_range=csi_pb2.CapacityRange(required_bytes=-1)),
]  # fmt: skip


def create_request(test_row: Row, name: str) -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
        parameters={"storageUrl": STORAGE_URL, **test_row.parameters},
    )
    for key, value in test_row.fields.items():
        request.ClearField(key)
        if isinstance(value, list):
            getattr(request, key).extend(value)
        elif isinstance(value, str):
            setattr(request, key, value)
        else:
            getattr(request, key).CopyFrom(value)
    return request


# -------------------------------------------------------------- ControllerPublishVolume

CONTROLLER_PUBLISH = [
    row("no node id", INVALID, "node_id is required", node_id=""),
    row("node id of 257 bytes", INVALID, "node_id", "256", node_id="n" * 257),
    # 200 characters, 400 bytes: the CSI bound is on bytes.
    row("node id of 400 bytes in 200 characters", INVALID, "node_id", "256", node_id="é" * 200),
    row("node id with a newline", INVALID, "node_id", node_id="node-a\n"),
]  # fmt: skip


# ------------------------------------------------------------------- NodeStageVolume
# The volume context normally comes from CreateVolume; a CO may send anything.

NODE_STAGE = [
    row("capacityBytes of a superscript digit", INVALID, "'capacityBytes'",
        volume_context={"capacityBytes": "²"}),
    row("capacityBytes of 5000 digits", INVALID, "'capacityBytes'",
        volume_context={"capacityBytes": "9" * 5000}),
    row("capacityBytes beyond int64", INVALID, "'capacityBytes'",
        volume_context={"capacityBytes": str(2**63)}),
    row("capacityBytes of zero", INVALID, "'capacityBytes'", volume_context={"capacityBytes": "0"}),
    row("capacityBytes missing", INVALID, "'capacityBytes'", volume_context={}),
    row("l0MaxSsts of 5000 digits", INVALID, "'l0MaxSsts'",
        volume_context={"capacityBytes": str(GiB), "l0MaxSsts": "9" * 5000}),
    row("cpuRequest whose exponent overflows a decimal", INVALID, "'cpuRequest'",
        volume_context={"capacityBytes": str(GiB), "cpuRequest": "1e999999999999"}),
    row("relative staging path", INVALID, "staging_target_path", staging_target_path="staging"),
    row("encryption password ZeroFS finds too short", INVALID, "'ZEROFS_ENCRYPTION_PASSWORD'",
        "at least 8 bytes", secrets={"ZEROFS_ENCRYPTION_PASSWORD": "seven77"}),
    row("ZeroFS's placeholder encryption password", INVALID, "'ZEROFS_ENCRYPTION_PASSWORD'",
        "placeholder", secrets={"ZEROFS_ENCRYPTION_PASSWORD": "CHANGEME"}),
]  # fmt: skip


def stage_request(test_row: Row, volume_id: str, staging: Path) -> csi_pb2.NodeStageVolumeRequest:
    context = {"storageUrl": STORAGE_URL, **test_row.fields.get("volume_context", {})}
    if "volume_context" not in test_row.fields:
        context["capacityBytes"] = str(GiB)
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=test_row.fields.get("staging_target_path", str(staging)),
        volume_capability=mount("ext4"),
        volume_context=context,
        secrets=test_row.fields.get("secrets", SECRETS),
    )


# ------------------------------------------------------------------- the other RPCs
# Requests that fail on their own fields, whatever the state: (service, method, request).


@dataclass(frozen=True)
class CallRow:
    case: str
    service: str
    method: str
    request: Any
    code: Code
    words: tuple[str, ...]


def call(case: str, method: str, request: Any, code: Code, *words: str) -> CallRow:
    service = "Node" if method.startswith("Node") else "Controller"
    return CallRow(case, service, method, request, code, words)


OTHER_CALLS = [
    call("delete without a volume id", "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=""),
         INVALID, "volume_id is required"),
    call("delete of a path", "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id="../x"),
         INVALID, "volume_id"),
    call("expand by a negative size", "ControllerExpandVolume",
         csi_pb2.ControllerExpandVolumeRequest(
             volume_id="pvc-1", capacity_range=csi_pb2.CapacityRange(required_bytes=-5)),
         INVALID, "required_bytes"),
    call("expand of an id with a newline", "ControllerExpandVolume",
         csi_pb2.ControllerExpandVolumeRequest(
             volume_id="pvc-1\n", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)),
         INVALID, "volume_id"),
    call("validate without capabilities", "ValidateVolumeCapabilities",
         csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="pvc-1"),
         INVALID, "volume_capabilities is required"),
    call("unpublish without a volume id", "ControllerUnpublishVolume",
         csi_pb2.ControllerUnpublishVolumeRequest(volume_id=""), INVALID, "volume_id is required"),
    call("publish to a relative path", "NodePublishVolume",
         csi_pb2.NodePublishVolumeRequest(volume_id="pvc-1", staging_target_path="/s",
                                          target_path="rel", volume_capability=mount()),
         INVALID, "target_path must be an absolute path"),
    call("publish to a path with NUL", "NodePublishVolume",
         csi_pb2.NodePublishVolumeRequest(volume_id="pvc-1", staging_target_path="/s",
                                          target_path="/t\x00x", volume_capability=mount()),
         INVALID, "target_path"),
    call("unpublish without a target", "NodeUnpublishVolume",
         csi_pb2.NodeUnpublishVolumeRequest(volume_id="pvc-1", target_path=""),
         INVALID, "target_path is required"),
    call("unstage a relative path", "NodeUnstageVolume",
         csi_pb2.NodeUnstageVolumeRequest(volume_id="pvc-1", staging_target_path="rel"),
         INVALID, "staging_target_path must be an absolute path"),
    call("node expand by a negative size", "NodeExpandVolume",
         csi_pb2.NodeExpandVolumeRequest(
             volume_id="pvc-1", volume_path="/v",
             capacity_range=csi_pb2.CapacityRange(required_bytes=-1)),
         INVALID, "must not be negative"),
]  # fmt: skip


# ----------------------------------------------------------------------- the plugin


@dataclass
class Running:
    plugin: Plugin
    channel: grpc.Channel
    state_dir: Path
    scratch: Path

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    def volume_records(self) -> list[str]:
        directory = self.state_dir / "volumes"
        return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="zc-bad-") as directory:
        root = Path(directory)
        config = parse_config(
            [
                "--role", "all",
                "--node-id", "node-a",
                "--endpoint", f"unix://{root}/csi.sock",
                "--metrics-address", "",
                "--backend", "local",
                "--state-dir", str(root / "state"),
            ]
        )  # fmt: skip
        plugin = build(config, checks=[])
        plugin.server.start()
        plugin.readiness.run_checks()
        channel = grpc.insecure_channel(f"unix://{plugin.socket_path}")
        try:
            yield Running(plugin, channel, root / "state", root / "scratch")
        finally:
            channel.close()
            plugin.server.stop(grace=None).wait()
            plugin.close()


def refused(call: Any, request: object, code: Code, words: tuple[str, ...]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    details = info.value.details() or ""
    assert info.value.code() is code, details
    for word in words:
        assert word in details, details


def _ids(rows: list[Row]) -> list[str]:
    return [r.case for r in rows]


def _volume_name(test_row: Row, rows: list[Row]) -> str:
    """A name of its own for each row, so that a row wrongly accepted spoils no other."""
    return f"pvc-bad-{rows.index(test_row)}"


@pytest.mark.parametrize("test_row", CREATE_VOLUME, ids=_ids(CREATE_VOLUME))
def test_create_volume_refuses(running: Running, test_row: Row) -> None:
    name = test_row.fields.get("name", _volume_name(test_row, CREATE_VOLUME))
    before = running.volume_records()
    refused(running.controller.CreateVolume, create_request(test_row, name), test_row.code,
            test_row.words)  # fmt: skip
    assert running.volume_records() == before


@pytest.mark.parametrize("test_row", CONTROLLER_PUBLISH, ids=_ids(CONTROLLER_PUBLISH))
def test_controller_publish_refuses(running: Running, test_row: Row) -> None:
    name = _volume_name(test_row, CONTROLLER_PUBLISH).replace("bad", "publish")
    created = running.controller.CreateVolume(
        create_request(row("valid", Code.OK), name), timeout=30
    ).volume
    try:
        request = csi_pb2.ControllerPublishVolumeRequest(
            volume_id=created.volume_id,
            volume_capability=mount(),
            volume_context=created.volume_context,
            **test_row.fields,
        )
        refused(running.controller.ControllerPublishVolume, request, test_row.code, test_row.words)
        status = running.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=created.volume_id), timeout=30
        ).status
        assert list(status.published_node_ids) == []
    finally:
        running.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=created.volume_id), timeout=30
        )
        running.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=created.volume_id), timeout=30
        )


@pytest.mark.parametrize("test_row", NODE_STAGE, ids=_ids(NODE_STAGE))
def test_node_stage_refuses(running: Running, test_row: Row) -> None:
    volume_id = _volume_name(test_row, NODE_STAGE).replace("bad", "stage")
    staging = running.scratch / "staging" / volume_id
    request = stage_request(test_row, volume_id, staging)
    refused(running.node.NodeStageVolume, request, test_row.code, test_row.words)
    assert not staging.exists()
    assert not (running.state_dir / "servers" / volume_id).exists()


@pytest.mark.parametrize("test_row", OTHER_CALLS, ids=[r.case for r in OTHER_CALLS])
def test_other_calls_refuse(running: Running, test_row: CallRow) -> None:
    stub = running.node if test_row.service == "Node" else running.controller
    before = running.volume_records()
    refused(getattr(stub, test_row.method), test_row.request, test_row.code, test_row.words)
    assert running.volume_records() == before


# ------------------------------------------------------------------------ the CLI


@dataclass(frozen=True)
class FlagRow:
    case: str
    argv: tuple[str, ...]
    words: tuple[str, ...]


def flag(case: str, argv: list[str], *words: str) -> FlagRow:
    return FlagRow(case, tuple(argv), words)


# Refused while parsing: nothing starts. "--node-id n" precedes each row's flags.
BAD_FLAGS = [
    flag("unknown role", ["--role", "gateway"], "--role"),
    flag("endpoint scheme", ["--endpoint", "http://x"], "endpoint must start with unix:// or tcp://"),
    flag("driver name with capitals", ["--driver-name", "Bad_Name"], "driver name"),
    flag("driver name with a trailing newline", ["--driver-name", "zerofs.csi\n"], "driver name"),
    flag("metrics address without a port", ["--metrics-address", "8080"], "--metrics-address"),
    flag("negative volume limit", ["--max-volumes-per-node", "-1"], "must not be negative"),
    flag("volume limit beyond int64", ["--max-volumes-per-node", str(2**63)],
         "--max-volumes-per-node", str(2**63 - 1)),
    flag("node id of 257 bytes", ["--node-id", "n" * 257], "--node-id", "256 bytes"),
    flag("node id of 400 bytes in 200 characters", ["--node-id", "é" * 200], "--node-id", "256"),
    flag("node id with a newline", ["--node-id", "node-a\n"], "--node-id"),
    flag("no workers", ["--workers", "0"], "at least 1"),
    flag("infinite shutdown grace", ["--shutdown-grace", "inf"], "--shutdown-grace", "finite"),
    flag("shutdown grace that is not a number", ["--shutdown-grace", "nan"], "--shutdown-grace"),
    flag("server removal timeout that is not a number", ["--server-removal-timeout", "nan"],
         "--server-removal-timeout"),
    flag("unknown log level", ["--log-level", "loud"], "--log-level"),
    flag("relative state dir", ["--state-dir", "relative/dir"], "absolute path"),
    flag("unknown flag", ["--no-such-flag"], "unrecognized arguments"),
]  # fmt: skip


def run_cli(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zerofs_csi", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line_exit_2(result: subprocess.CompletedProcess[str], words: tuple[str, ...]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("test_row", BAD_FLAGS, ids=[r.case for r in BAD_FLAGS])
def test_bad_flag_is_one_line_and_exit_2(test_row: FlagRow) -> None:
    line = one_line_exit_2(run_cli(["--node-id", "n", *test_row.argv]), test_row.words)
    assert line.startswith("zerofs-csi: error:")


# Refused at start-up, before serving: the flags parse, what they name cannot be used.
# Placeholders: {busy} is a TCP port something listens on, {file} a regular file.
START_UP = [
    flag("metrics port in use", ["--metrics-address", "127.0.0.1:{busy}"],
         "--metrics-address", "127.0.0.1:{busy}"),
    flag("metrics host that does not resolve", ["--metrics-address", "no-such-host.invalid:9100"],
         "--metrics-address", "no-such-host.invalid"),
    flag("state dir under a regular file", ["--state-dir", "{file}/state"],
         "--state-dir", "{file}/state"),
]  # fmt: skip


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("test_row", START_UP, ids=[r.case for r in START_UP])
def test_unusable_start_up_value_is_one_line_and_exit_2(test_row: FlagRow, busy_port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="zc-cli-") as directory:
        root = Path(directory)
        (root / "file").write_text("")
        places = {"busy": str(busy_port), "file": str(root / "file")}
        argv = [
            "--role", "controller",
            "--backend", "local",
            "--endpoint", f"unix://{root}/csi.sock",
            "--metrics-address", "",
            "--state-dir", str(root / "state"),
        ]  # fmt: skip
        argv += [arg.format(**places) for arg in test_row.argv]
        result = run_cli(argv, timeout=30)
        one_line_exit_2(result, tuple(word.format(**places) for word in test_row.words))
        assert not (root / "csi.sock").exists()
