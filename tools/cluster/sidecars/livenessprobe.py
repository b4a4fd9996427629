#!/usr/bin/env python3
"""Stand-in for livenessprobe (registry.k8s.io/sig-storage/livenessprobe, which the Go
module proxy does not serve): kubelet's HTTP liveness probe of a CSI driver.

At start it waits up to 5 minutes for the driver at --csi-address and asks its name
(GetPluginInfo; a driver that does not answer in that time ends the process with status
1). Then each GET /healthz on --http-endpoint (default: every address, --health-port
9808) connects to the driver and calls Probe with --probe-timeout: 200 "ok" when the
driver answers ready (or leaves ready unset), 500 with the reason when it answers not
ready, fails the call, does not answer in time or is not there.
"""

from __future__ import annotations

import signal
import threading

import csi_pb2
import csi_pb2_grpc
import grpc
from csi_sidecar import driver_name, go_duration, grpc_target, log, parser, serve_health

PROGRAM = "livenessprobe"
# As long as the connection back-off of a crashing driver: not a crash loop of our own.
DRIVER_WAIT_S = 300.0


def probe(address: str, timeout: float) -> tuple[int, str]:
    try:
        with grpc.insecure_channel(grpc_target(address)) as channel:
            reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                csi_pb2.ProbeRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        return 500, f"{exc.code().name}: {exc.details()}"
    if reply.HasField("ready") and not reply.ready.value:
        return 500, "driver responded but is not ready"
    return 200, "ok"


def main() -> int:
    flags = parser(PROGRAM, "HTTP liveness probe of a CSI driver (zerofs-csi stand-in).")
    flags.add_argument("--probe-timeout", type=go_duration, default=1.0, help="of each Probe")
    flags.add_argument("--http-endpoint", default="", help="[host]:port of GET /healthz")
    flags.add_argument("--health-port", type=int, default=9808, help="without --http-endpoint")
    args = flags.parse_args()

    name = driver_name(args.csi_address, rpc_timeout=None, wait=DRIVER_WAIT_S)
    log(f"CSI driver name: {name}")
    endpoint = args.http_endpoint or f":{args.health_port}"
    server = serve_health(endpoint, lambda: probe(args.csi_address, args.probe_timeout), args.v)

    stopped = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
