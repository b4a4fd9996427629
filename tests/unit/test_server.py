"""The gRPC server over a real unix socket: Identity, error mapping, socket handling."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from zerofs_csi import __version__
from zerofs_csi.bench.plugin import wait_until
from zerofs_csi.cli import parse_config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.errors import InvalidArgument
from zerofs_csi.observability.readiness import Check
from zerofs_csi.server import EndpointInUse, Plugin, build, prepare_unix_socket

SECRET = "s3cr3t-value-that-must-not-leak"


def start(tmp_path: Path, role: str, checks: list[Check] | None = None) -> Plugin:
    config = parse_config(
        [
            "--role",
            role,
            "--node-id",
            "node-a",
            "--endpoint",
            f"unix://{tmp_path}/csi.sock",
            "--metrics-address",
            "",
            "--max-volumes-per-node",
            "7",
            "--backend",
            "local",
            "--state-dir",
            str(tmp_path / "state"),
        ]
    )
    plugin = build(config, checks=checks)
    plugin.server.start()
    return plugin


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    plugin = start(tmp_path, "all", checks=[])
    plugin.readiness.run_checks()
    yield plugin
    plugin.server.stop(grace=None).wait()
    plugin.close()


@pytest.fixture
def channel(plugin: Plugin) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        yield channel


def test_plugin_info(channel: grpc.Channel) -> None:
    info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "zerofs.csi.driver"
    assert info.vendor_version == __version__


@pytest.mark.parametrize(
    ("role", "services"),
    [
        ("all", [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]),
        ("controller", [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]),
        ("node", []),
    ],
)
def test_plugin_capabilities_follow_role(tmp_path: Path, role: str, services: list[int]) -> None:
    plugin = start(tmp_path, role, checks=[])
    try:
        with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
            reply = csi_pb2_grpc.IdentityStub(channel).GetPluginCapabilities(
                csi_pb2.GetPluginCapabilitiesRequest()
            )
        assert [c.service.type for c in reply.capabilities if c.HasField("service")] == services
        expansion = [
            c.volume_expansion.type for c in reply.capabilities if c.HasField("volume_expansion")
        ]
        assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.OFFLINE]
    finally:
        plugin.server.stop(grace=None).wait()


def test_probe_not_ready_until_checks_ran_then_ready(tmp_path: Path) -> None:
    plugin = start(tmp_path, "node", checks=[Check("always fine", lambda: None)])
    try:
        with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            assert identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
            plugin.readiness.run_checks()
            assert identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    finally:
        plugin.server.stop(grace=None).wait()


def test_probe_failed_check_is_failed_precondition(tmp_path: Path) -> None:
    plugin = start(tmp_path, "node", checks=[Check("nbd", lambda: "nbd missing: modprobe nbd")])
    plugin.readiness.run_checks()
    try:
        with (
            grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest())
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "modprobe nbd" in info.value.details()
    finally:
        plugin.server.stop(grace=None).wait()


def test_node_info(channel: grpc.Channel) -> None:
    info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert (info.node_id, info.max_volumes_per_node) == ("node-a", 7)


def _rpcs(service: str) -> list[tuple[str, str]]:
    methods = csi_pb2.DESCRIPTOR.services_by_name[service].methods
    return [(service, m.name) for m in methods]


def _advertised_or_built(service: str, method: str) -> bool:
    from zerofs_csi.controller.service import ControllerService
    from zerofs_csi.node.service import NodeService

    cls = ControllerService if service == "Controller" else NodeService
    return getattr(getattr(cls, method), "__qualname__", "").startswith(cls.__name__)


@pytest.mark.parametrize(("service", "method"), _rpcs("Controller") + _rpcs("Node"))
def test_every_rpc_answers(channel: grpc.Channel, service: str, method: str) -> None:
    """Every RPC of the spec is registered; one not built is UNIMPLEMENTED with a message."""
    descriptor = csi_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    request_cls = getattr(csi_pb2, descriptor.input_type.name)
    response_cls = getattr(csi_pb2, descriptor.output_type.name)
    call = channel.unary_unary(
        f"/csi.v1.{service}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    try:
        call(request_cls(), timeout=10)
    except grpc.RpcError as exc:
        if _advertised_or_built(service, method):
            assert exc.code() is not grpc.StatusCode.UNIMPLEMENTED
        else:
            assert exc.code() is grpc.StatusCode.UNIMPLEMENTED
            assert method in exc.details() and "not supported" in exc.details()
    else:
        assert _advertised_or_built(service, method), f"{method} answered OK but is not built"


def _serve_one(tmp_path: Path, behaviour: object) -> tuple[grpc.Server, str]:
    """A server with the driver's interceptor and one Identity method doing ``behaviour``."""
    from zerofs_csi.observability.sanitize import REDACTOR
    from zerofs_csi.rpc.interceptor import CsiInterceptor

    class Identity(csi_pb2_grpc.IdentityServicer):
        def GetPluginInfo(self, request, context):  # type: ignore[no-untyped-def]
            return behaviour(request)  # type: ignore[operator]

    server = grpc.server(
        futures.ThreadPoolExecutor(2),
        interceptors=[CsiInterceptor(REDACTOR)],
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    target = f"unix://{tmp_path}/one.sock"
    server.add_insecure_port(target)
    server.start()
    return server, target


def _raise(exc: Exception) -> object:
    def behaviour(request: object) -> object:
        raise exc

    return behaviour


@pytest.mark.parametrize(
    ("exc", "code", "detail"),
    [
        (InvalidArgument("volume_id is required"), grpc.StatusCode.INVALID_ARGUMENT, "volume_id"),
        (KeyError("boom"), grpc.StatusCode.INTERNAL, "request id"),
        (RuntimeError(f"leaked {SECRET}"), grpc.StatusCode.INTERNAL, "internal error"),
    ],
)
def test_interceptor_maps_errors(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    server, target = _serve_one(tmp_path, _raise(exc))
    try:
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
            csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    finally:
        server.stop(grace=None).wait()
    assert info.value.code() is code
    assert detail in info.value.details()
    assert SECRET not in info.value.details()
    request_ids = [v for k, v in info.value.trailing_metadata() or () if k == "x-request-id"]
    assert len(request_ids) == 1 and len(request_ids[0]) == 16
    if code is grpc.StatusCode.INTERNAL:
        assert request_ids[0] in info.value.details()
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert tracebacks and tracebacks[0].request_id == request_ids[0]  # type: ignore[attr-defined]


def test_secrets_never_reach_the_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Secrets passed in a request are masked in debug dumps and in echoed error text."""
    from zerofs_csi.config import LogFormat
    from zerofs_csi.observability import logs as logsetup

    logsetup.configure("debug", LogFormat.JSON)
    try:
        plugin = start(tmp_path, "all", checks=[])
        with (
            grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            csi_pb2_grpc.ControllerStub(channel).CreateVolume(
                csi_pb2.CreateVolumeRequest(name="pvc-1", secrets={"secretAccessKey": SECRET})
            )
        plugin.server.stop(grace=None).wait()
        logging.getLogger("test").error("library echoed %s", SECRET)
    finally:
        logging.getLogger().handlers.clear()
    err = capfd.readouterr().err
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "secretAccessKey" in err  # the request was dumped ...
    assert "pvc-1" in err
    assert SECRET not in err  # ... without the secret


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    prepare_unix_socket(path)
    assert not path.exists()


def test_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(EndpointInUse, match="another server is listening"):
            prepare_unix_socket(path)
        assert path.exists()
    finally:
        live.close()


def test_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("not a socket")
    with pytest.raises(EndpointInUse, match="not a socket"):
        prepare_unix_socket(path)
    assert path.read_text() == "not a socket"


def test_in_flight_call_finishes_during_graceful_stop(tmp_path: Path) -> None:
    started = threading.Event()

    def slow(request: object) -> csi_pb2.GetPluginInfoResponse:
        started.set()
        time.sleep(1.0)
        return csi_pb2.GetPluginInfoResponse(name="slow")

    server, target = _serve_one(tmp_path, slow)
    with grpc.insecure_channel(target) as channel:
        future = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo.future(
            csi_pb2.GetPluginInfoRequest()
        )
        assert started.wait(10)
        server.stop(grace=10)
        assert future.result(timeout=10).name == "slow"


def test_sigterm_stops_and_removes_socket(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zerofs_csi",
            "--role",
            "controller",
            "--endpoint",
            f"unix://{sock}",
            "--metrics-address",
            "",
            "--backend",
            "local",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(sock.exists, 30.0, f"{sock} to appear")
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=10
            )
        assert info.name == "zerofs.csi.driver"
        # A second server on the same socket refuses to start and leaves the first alone.
        second = subprocess.run(
            [sys.executable, "-m", "zerofs_csi", "--role", "controller", "--endpoint",
             f"unix://{sock}", "--metrics-address", "", "--backend", "local",
             "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        assert "another server is listening" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not sock.exists()
    assert '"msg":"stopped"' in (proc.stderr.read() if proc.stderr else "")
