"""The driver's frozen run-time configuration, built once from command-line flags."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

# CSI spec, NodeGetInfoResponse.node_id: at most 256 bytes. ControllerPublishVolume
# refuses other ids, so a node plugin started with one could never be published to.
MAX_NODE_ID_BYTES = 256
NODE_ID_RULE = f"must be printable and at most {MAX_NODE_ID_BYTES} bytes long (UTF-8)"
# NodeGetInfoResponse.max_volumes_per_node is an int64.
MAX_VOLUMES_PER_NODE = 2**63 - 1


def socket_root_of(state_dir: Path) -> Path:
    """Where the volume servers' sockets live under a state directory."""
    return state_dir / "sockets"


def node_id_fits(node_id: str) -> bool:
    """Whether ``node_id`` follows ``NODE_ID_RULE``."""
    return node_id.isprintable() and len(node_id.encode()) <= MAX_NODE_ID_BYTES


class Role(enum.StrEnum):
    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"

    @property
    def serves_controller(self) -> bool:
        return self in (Role.CONTROLLER, Role.ALL)

    @property
    def serves_node(self) -> bool:
        return self in (Role.NODE, Role.ALL)


class Backend(enum.StrEnum):
    """Where per-volume servers run and volume metadata lives."""

    KUBERNETES = "kubernetes"  # server pods + Secrets, metadata in ConfigMaps
    LOCAL = "local"  # server child processes, metadata in files under the state dir


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


@dataclass(frozen=True)
class Endpoint:
    """Where the CSI gRPC server listens: a unix socket path or a TCP host:port."""

    scheme: str  # "unix" or "tcp"
    address: str  # socket path, or host:port

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``unix:///path/csi.sock``, ``unix:/path`` or ``tcp://host:port``."""
        if text.startswith("unix://"):
            path = text[len("unix://") :]
        elif text.startswith("unix:"):
            path = text[len("unix:") :]
        elif text.startswith("tcp://"):
            hostport = text[len("tcp://") :]
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"tcp endpoint needs host:port with a port in 1..65535: {text!r}")
            return cls("tcp", hostport)
        else:
            raise ValueError(f"endpoint must start with unix:// or tcp://: {text!r}")
        if not path.startswith("/"):
            raise ValueError(f"unix endpoint needs an absolute socket path: {text!r}")
        return cls("unix", path)

    @property
    def grpc_target(self) -> str:
        """The address in the form grpc's add_insecure_port and channels accept."""
        return f"unix://{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"


@dataclass(frozen=True)
class Config:
    endpoint: Endpoint
    node_id: str
    role: Role
    driver_name: str
    metrics_address: str  # host:port; empty disables the metrics server
    log_level: str
    log_format: LogFormat
    state_dir: Path  # host directory that survives plugin restarts
    namespace: str  # where per-volume server pods and Secrets live
    max_volumes_per_node: int  # 0: no limit reported to the scheduler
    workers: int  # gRPC worker threads
    shutdown_grace_seconds: float
    backend: Backend
    zerofs_command: str  # the ZeroFS executable the local backend runs
    kubeconfig: str  # empty: in-cluster configuration
    daemonset_name: str  # empty: found through the plugin's own pod (env POD_NAME)
    server_removal_timeout_seconds: float
    # A local volume server answering no NBD handshake for this long is restarted; 0: never.
    server_hung_timeout_seconds: float = 60.0
    # Kubernetes backend: the image of job pods' job containers (the plugin's own), which
    # restore volumes and checkpoint volumes staged nowhere; empty: neither is done.
    job_image: str = ""
    # A job pod no call has stepped for this long was given up and is removed; 0: never.
    job_idle_timeout_seconds: float = 900.0

    @property
    def socket_root(self) -> Path:
        """Host directory holding each volume server's NBD and 9P sockets."""
        return socket_root_of(self.state_dir)
