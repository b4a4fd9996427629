#!/usr/bin/env python3
"""Stand-in for node-driver-registrar (registry.k8s.io/sig-storage/csi-node-driver-registrar,
which the Go module proxy does not serve): registers the node plugin with kubelet.

Asks the driver at --csi-address for its name (GetPluginInfo, waiting for ever for the
socket, then --timeout for the answer), then serves kubelet's plugin registration API on
``<--plugin-registration-path>/<driver name>-reg.sock`` (only the owner may connect, as
the socket is made under umask 077). kubelet's plugin watcher finds the socket, calls
GetInfo (type CSIPlugin, the driver's name, --kubelet-registration-path as its endpoint,
version 1.0.0) and then NotifyRegistrationStatus; a registration kubelet refused ends the
process with status 1, so that the container restarts and registration is tried again.
With --http-endpoint, GET /healthz answers 200 while the registration socket answers
GetInfo with the driver's name, 404 when the socket is gone and 500 otherwise.
SIGTERM removes the socket and exits 0.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pluginregistration_pb2
import pluginregistration_pb2_grpc
from csi_sidecar import driver_name, go_duration, log, parser, serve_health

PROGRAM = "csi-node-driver-registrar"
PLUGIN_TYPE = "CSIPlugin"
# Versions of kubelet's CSI plugin API this registrar offers (kubelet knows 1.0.0).
SUPPORTED_VERSIONS = ("1.0.0",)


class Registration(pluginregistration_pb2_grpc.RegistrationServicer):
    def __init__(self, name: str, endpoint: str, finished: threading.Event) -> None:
        self.name = name
        self.endpoint = endpoint
        self.finished = finished
        self.refused = False

    def GetInfo(  # noqa: N802 (gRPC method name)
        self, request: pluginregistration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.PluginInfo:
        log("kubelet asked for the plugin's info (GetInfo)")
        return pluginregistration_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=self.name,
            endpoint=self.endpoint,
            supported_versions=SUPPORTED_VERSIONS,
        )

    def NotifyRegistrationStatus(  # noqa: N802 (gRPC method name)
        self, request: pluginregistration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        if request.plugin_registered:
            log(f"kubelet registered {self.name}")
        else:
            log(f"error: kubelet refused to register {self.name}: {request.error}; exiting")
            self.refused = True
            self.finished.set()
        return pluginregistration_pb2.RegistrationStatusResponse()


def remove_socket(path: Path) -> None:
    """Removes a socket left at ``path``; anything else there is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"{path} exists and is not a socket: not removing it")
    path.unlink()


def health(socket_path: Path, name: str, timeout: float) -> tuple[int, str]:
    if not socket_path.exists():
        return 404, "registration socket does not exist"
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            info = pluginregistration_pb2_grpc.RegistrationStub(channel).GetInfo(
                pluginregistration_pb2.InfoRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        return 500, f"error getting info from {socket_path}: {exc.code().name}: {exc.details()}"
    if info.name != name:
        return 500, f"invalid driver name {info.name}"
    return 200, "ok"


def main() -> int:
    flags = parser(PROGRAM, "Registers a CSI node plugin with kubelet (zerofs-csi stand-in).")
    flags.add_argument(
        "--kubelet-registration-path",
        default="",
        help="the driver's CSI socket as a path on the node, handed to kubelet (required)",
    )
    flags.add_argument(
        "--plugin-registration-path",
        default="/registration",
        help="kubelet's plugins_registry directory as mounted here",
    )
    flags.add_argument("--http-endpoint", default="", help="[host]:port of GET /healthz")
    flags.add_argument("--timeout", type=go_duration, default=1.0, help="for each call")
    args = flags.parse_args()
    if not args.kubelet_registration_path:
        flags.error("--kubelet-registration-path is required")

    name = driver_name(args.csi_address, rpc_timeout=args.timeout, wait=None)
    log(f"CSI driver name: {name}")
    socket_path = Path(args.plugin_registration_path) / f"{name}-reg.sock"
    remove_socket(socket_path)

    finished = threading.Event()
    registration = Registration(name, args.kubelet_registration_path, finished)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(registration, server)
    # gRPC binds the socket here: only the owner (kubelet runs as root) may connect.
    previous = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    finally:
        os.umask(previous)
    server.start()
    log(f"registration socket: {socket_path}")

    def stop(signum: int, frame: object) -> None:
        finished.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.http_endpoint:
        serve_health(args.http_endpoint, lambda: health(socket_path, name, args.timeout), args.v)
    finished.wait()
    # Let kubelet have its NotifyRegistrationStatus answer before the socket goes.
    server.stop(grace=1).wait()
    socket_path.unlink(missing_ok=True)
    return 1 if registration.refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
