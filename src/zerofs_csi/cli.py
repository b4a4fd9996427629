"""Command line: flags become a frozen Config, then the chosen role is served."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from zerofs_csi import DRIVER_NAME, __version__
from zerofs_csi.config import (
    MAX_VOLUMES_PER_NODE,
    NODE_ID_RULE,
    Backend,
    Config,
    Endpoint,
    LogFormat,
    Role,
    node_id_fits,
)

# CSI plugin names are reverse domain names of at most 63 characters (CSI spec, GetPluginInfo).
DRIVER_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _driver_name(text: str) -> str:
    if not DRIVER_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"driver name must be a DNS-style name of at most 63 lowercase characters: {text!r}"
        )
    return text


def _host_port(text: str) -> str:
    if text == "":
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected [host]:port with a port in 1..65535, or an empty string: {text!r}"
        )
    return text


def _node_id(text: str) -> str:
    if text and not node_id_fits(text):
        raise argparse.ArgumentTypeError(f"the node id {NODE_ID_RULE}")
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _volume_limit(text: str) -> int:
    value = _non_negative_int(text)
    if value > MAX_VOLUMES_PER_NODE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_VOLUMES_PER_NODE}: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zerofs-csi",
        description=(
            "CSI driver for block volumes served by ZeroFS: the controller role creates, "
            "deletes and publishes volumes; the node role runs each volume's ZeroFS server, "
            "attaches its NBD export as /dev/nbdX and mounts it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--endpoint",
        type=_endpoint,
        default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="CSI gRPC endpoint: unix:///path/to/csi.sock or tcp://host:port (env CSI_ENDPOINT)",
    )
    parser.add_argument(
        "--node-id",
        type=_node_id,
        default=os.environ.get("NODE_ID") or os.environ.get("KUBE_NODE_NAME", ""),
        help="this node's name, required for the node role; with --backend local also the "
        "one node the controller publishes to (env NODE_ID or KUBE_NODE_NAME)",
    )
    parser.add_argument(
        "--role",
        type=Role,
        choices=list(Role),
        default=Role.ALL,
        help="which CSI services to serve (Identity is always served)",
    )
    parser.add_argument(
        "--driver-name", type=_driver_name, default=DRIVER_NAME, help="CSI driver name"
    )
    parser.add_argument(
        "--metrics-address",
        type=_host_port,
        default=":8080",
        help="where Prometheus metrics and /healthz are served; empty disables",
    )
    parser.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info", help="minimum level logged"
    )
    parser.add_argument(
        "--log-format",
        type=LogFormat,
        choices=list(LogFormat),
        default=LogFormat.JSON,
        help="one JSON object per line, or readable text",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/zerofs-csi"),
        help="host directory for device reservations and volume server state; "
        "must survive plugin restarts",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "zerofs"),
        help="namespace of the per-volume ZeroFS pods and their Secrets (env POD_NAMESPACE)",
    )
    parser.add_argument(
        "--max-volumes-per-node",
        type=_volume_limit,
        default=0,
        help="volumes the scheduler may place on one node, and with --backend local the "
        "volumes the controller publishes to it; 0 means no limit",
    )
    parser.add_argument(
        "--backend",
        type=Backend,
        choices=list(Backend),
        default=Backend.KUBERNETES,
        help="kubernetes: per-volume ZeroFS pods and metadata in the API; local: ZeroFS "
        "child processes and metadata files under --state-dir (tests, non-Kubernetes hosts)",
    )
    parser.add_argument(
        "--zerofs-command",
        default="zerofs",
        help="ZeroFS executable run by the local backend (`CMD run -c CONFIG`)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG", ""),
        help="kubeconfig for the kubernetes backend; empty uses the in-cluster service account",
    )
    parser.add_argument(
        "--daemonset-name",
        default=os.environ.get("DAEMONSET_NAME", ""),
        help="the node DaemonSet that owns per-volume server pods; empty finds it through "
        "this plugin's own pod (env POD_NAME) (env DAEMONSET_NAME)",
    )
    parser.add_argument(
        "--job-image",
        default=os.environ.get("JOB_IMAGE", ""),
        help="kubernetes: the image (this plugin's) of the job pods that fill a volume "
        "created from a snapshot or a volume and take checkpoints of volumes staged "
        "nowhere; empty: neither is done, and CLONE_VOLUME is not offered (env JOB_IMAGE)",
    )
    parser.add_argument(
        "--job-idle-timeout",
        type=_seconds,
        default=900.0,
        help="kubernetes: seconds a job pod may go without a CSI call asking for its job "
        "(its claim or snapshot was deleted meanwhile; the CSI sidecars retry every five "
        "minutes at most) before it is removed, with a clone's checkpoint; 0: never",
    )
    parser.add_argument(
        "--server-removal-timeout",
        type=_seconds,
        default=75.0,
        help="seconds a per-volume server pod gets to stop (it flushes to the object "
        "store) before it is force-deleted",
    )
    parser.add_argument(
        "--server-hung-timeout",
        type=_seconds,
        default=60.0,
        help="seconds a local volume server may answer no NBD handshake before it is "
        "declared hung and restarted (its I/O waits meanwhile; never failed); 0 disables",
    )
    parser.add_argument("--workers", type=_positive_int, default=16, help="gRPC worker threads")
    parser.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=30.0,
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role.serves_node and not args.node_id:
        parser.error("--node-id (or NODE_ID) is required when the node role is served")
    if not args.state_dir.is_absolute():
        parser.error(f"--state-dir must be an absolute path: {str(args.state_dir)!r}")
    return Config(
        endpoint=args.endpoint,
        node_id=args.node_id,
        role=args.role,
        driver_name=args.driver_name,
        metrics_address=args.metrics_address,
        log_level=args.log_level,
        log_format=args.log_format,
        state_dir=args.state_dir,
        namespace=args.namespace,
        max_volumes_per_node=args.max_volumes_per_node,
        workers=args.workers,
        shutdown_grace_seconds=args.shutdown_grace,
        backend=args.backend,
        zerofs_command=args.zerofs_command,
        kubeconfig=args.kubeconfig,
        daemonset_name=args.daemonset_name,
        server_removal_timeout_seconds=args.server_removal_timeout,
        server_hung_timeout_seconds=args.server_hung_timeout,
        job_image=args.job_image,
        job_idle_timeout_seconds=args.job_idle_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    from zerofs_csi.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
