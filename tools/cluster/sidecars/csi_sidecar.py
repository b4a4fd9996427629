"""What the project's stand-ins for two Kubernetes CSI sidecars share.

The test cluster builds every image it runs, and the Go module proxy does not serve
node-driver-registrar v2.17.0 or livenessprobe v2.20.0 (their v2 tags are not versions
of their module paths, which lack ``/v2``), so the cluster runs these stand-ins under
the names and tags the chart pins. They take the same flags the chart passes (Go flag
syntax: ``--name=value``; durations as Go writes them, ``10s``) and answer the same way.
The gRPC modules they import (``csi_pb2``, ``pluginregistration_pb2``) are generated
next to them by generate_stubs.py, from the project's proto/csi.proto and
pluginregistration.proto.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import csi_pb2
import csi_pb2_grpc
import grpc

# Set in the image by tools/cluster/images.sh: the release of the sidecar stood in for.
VERSION = os.environ.get("CSI_SIDECAR_STANDIN_VERSION", "unknown")

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# While the CSI socket does not answer, say so this often (csi-lib-utils does too).
STILL_CONNECTING_EVERY_S = 10.0
# Retry a driver that is not listening yet every second, not on gRPC's back-off of up to
# two minutes: a plugin that starts late is registered as soon as it listens.
_CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 1000)]


def go_duration(text: str) -> float:
    """Seconds in a Go duration (``1s``, ``1m30s``, ``500ms``, ``0``)."""
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 1s, 500ms, 2m)")
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


def parser(program: str, description: str) -> argparse.ArgumentParser:
    """Flags every stand-in takes: --csi-address, --v (klog's verbosity) and --version."""
    flags = argparse.ArgumentParser(prog=program, description=description)
    flags.add_argument(
        "--csi-address",
        default="/run/csi/socket",
        help="the CSI driver's socket: a path or unix://path",
    )
    flags.add_argument("--v", type=int, default=0, help="log verbosity (5: every health check)")
    flags.add_argument(
        "--version", action="version", version=f"{program} {VERSION} (zerofs-csi stand-in)"
    )
    return flags


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


def grpc_target(address: str) -> str:
    """A gRPC target for a socket given as a path or as unix://path."""
    path = address.removeprefix("unix://")
    if not path.startswith("/"):
        raise SystemExit(f"--csi-address {address!r}: give an absolute path or unix:///path")
    return f"unix:{path}"


def driver_name(address: str, rpc_timeout: float | None, wait: float | None) -> str:
    """GetPluginInfo's name, once the driver's socket answers.

    Waits for the socket ``wait`` seconds (None: for ever), saying so every 10 s; the
    call itself then has ``rpc_timeout``. Exits 1 when either runs out, or the call fails.
    """
    deadline = None if wait is None else time.monotonic() + wait
    with grpc.insecure_channel(grpc_target(address), options=_CHANNEL_OPTIONS) as channel:
        ready = grpc.channel_ready_future(channel)
        while True:
            step = STILL_CONNECTING_EVERY_S
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            try:
                ready.result(timeout=step)
                break
            except grpc.FutureTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    log(f"error: the CSI driver at {address} did not answer within {wait:g}s")
                    raise SystemExit(1) from None
                log(f"still connecting to the CSI driver at {address}")
        try:
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=rpc_timeout
            )
        except grpc.RpcError as exc:
            log(f"error: GetPluginInfo of {address}: {exc.code().name}: {exc.details()}")
            raise SystemExit(1) from None
    if not info.name:
        log(f"error: the CSI driver at {address} has an empty name")
        raise SystemExit(1)
    return info.name


HealthCheck = Callable[[], tuple[int, str]]


def serve_health(endpoint: str, check: HealthCheck, verbosity: int) -> ThreadingHTTPServer:
    """Serves GET /healthz on ``host:port`` (``:port``: every address) from a thread:
    the status and text ``check`` returns."""
    host, separator, port = endpoint.rpartition(":")
    if not separator or not port.isdigit():
        raise SystemExit(f"--http-endpoint {endpoint!r}: expected [host]:port")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/healthz":
                self._answer(404, "404 page not found")
                return
            status, text = check()
            if status != 200 or verbosity >= 5:
                log(f"health check: {status} {text}")
            self._answer(status, text)

        def _answer(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # requests are logged by do_GET, failures always

    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    log(f"serving /healthz on {endpoint}")
    return server
