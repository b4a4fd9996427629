"""The CSI gRPC server: socket handling, service wiring, graceful shutdown."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from zerofs_csi.config import Config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.node.checks import node_checks
from zerofs_csi.observability import logs as logsetup
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.metrics_http import MetricsServer
from zerofs_csi.observability.readiness import Check, Readiness
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.rpc.identity import IdentityService, expansion_capability, service_capability
from zerofs_csi.rpc.interceptor import CsiInterceptor
from zerofs_csi.runtime import NodeRuntime, StartupError, build_controller, build_node
from zerofs_csi.shutdown import stop_on_signals

log = logging.getLogger(__name__)


class EndpointInUse(RuntimeError):
    pass


def prepare_unix_socket(path: Path) -> None:
    """Make ``path`` bindable: remove a stale socket, refuse one a live server holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)  # stale: nobody is listening
        log.info("removed stale socket", extra={"path": str(path)})
        return
    finally:
        probe.close()
    raise EndpointInUse(f"another server is listening on {path}; refusing to start")


@dataclass
class Plugin:
    """A built, not yet started, CSI server and what it needs at shutdown."""

    server: grpc.Server
    readiness: Readiness
    socket_path: Path | None
    port: int
    metrics: Metrics
    registry: CollectorRegistry
    node: NodeRuntime | None = None

    def close(self) -> None:
        if self.node is not None:
            self.node.close()


def build(config: Config, checks: list[Check] | None = None) -> Plugin:
    """Wire the services for ``config.role``.

    ``checks`` replaces the default start-up checks (host checks, then recovery and the
    LINK_DEAD monitor for the node role); Probe is not ready until they passed.
    """
    # Expansion is offline: the node grows a staged, unpublished volume (see node.py).
    capabilities = [expansion_capability(csi_pb2.PluginCapability.VolumeExpansion.OFFLINE)]
    if config.role.serves_controller:
        capabilities.append(service_capability(csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE))

    # One registry per plugin instance, so that several can live in one test process.
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    metrics = Metrics(config.node_id, registry)
    node = build_node(config, metrics) if config.role.serves_node else None
    if checks is None:
        checks = [*node_checks(), *node.start_checks()] if node is not None else []
    readiness = Readiness(checks)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="csi"),
        interceptors=[CsiInterceptor(REDACTOR, observers=[metrics.observe_call])],
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityService(config.driver_name, readiness, capabilities), server
    )
    if config.role.serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(build_controller(config, metrics), server)
    if node is not None:
        csi_pb2_grpc.add_NodeServicer_to_server(node.service, server)

    socket_path = None
    if config.endpoint.scheme == "unix":
        socket_path = Path(config.endpoint.address)
        prepare_unix_socket(socket_path)
    port = server.add_insecure_port(config.endpoint.grpc_target)
    return Plugin(server, readiness, socket_path, port, metrics, registry, node)


def run(config: Config) -> int:
    logsetup.configure(config.log_level, config.log_format)
    try:
        plugin = build(config)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except (EndpointInUse, OSError, RuntimeError) as exc:
        log.error("cannot serve %s: %s", config.endpoint, exc)
        return 1

    metrics = None
    if config.metrics_address:
        try:
            metrics = MetricsServer(config.metrics_address, plugin.readiness, plugin.registry)
        except OSError as exc:  # in use, or a host that does not resolve
            plugin.close()
            if plugin.socket_path is not None:
                plugin.socket_path.unlink(missing_ok=True)
            log.error(
                "cannot start: --metrics-address %s: %s",
                config.metrics_address,
                exc.strerror or exc,
            )
            return 2
        metrics.start()

    stop = stop_on_signals(log)

    plugin.server.start()
    if plugin.socket_path is not None:
        os.chmod(plugin.socket_path, 0o660)
    log.info(
        "serving",
        extra={
            "endpoint": str(config.endpoint),
            "role": config.role.value,
            "driver": config.driver_name,
            "node_id": config.node_id,
        },
    )
    plugin.readiness.start()
    stop.wait()

    # New calls are refused at once; in-flight ones get the grace period to finish.
    plugin.server.stop(grace=config.shutdown_grace_seconds).wait()
    if metrics is not None:
        metrics.stop()
    plugin.close()
    if plugin.socket_path is not None:
        plugin.socket_path.unlink(missing_ok=True)
    log.info("stopped")
    return 0
