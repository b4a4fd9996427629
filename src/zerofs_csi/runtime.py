"""Builds each role's service from the frozen config: the one place backends are chosen."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zerofs_csi import link_keeper
from zerofs_csi.config import Backend, Config
from zerofs_csi.controller.checkpoints import LocalCheckpoints
from zerofs_csi.controller.nodes import LocalNodes
from zerofs_csi.controller.service import ControllerService
from zerofs_csi.controller.snapshot_store import FileSnapshotStore
from zerofs_csi.controller.store import FileVolumeStore
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.node.link_monitor import LinkMonitor
from zerofs_csi.node.recovery import Recovery
from zerofs_csi.node.service import NodeService
from zerofs_csi.node.stage_record import RecordStore
from zerofs_csi.node.staging import Stager
from zerofs_csi.observability.events import EventRecorder, KubernetesEventRecorder, LogEventRecorder
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.readiness import Check
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.servers import ninep
from zerofs_csi.servers.base import VolumeServerBackend
from zerofs_csi.servers.local import ProcessBackend

if TYPE_CHECKING:  # the kubernetes client is imported only by the kubernetes backend
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Something a flag names cannot be used; the plugin reports it in one line and exits
    with status 2 instead of serving."""


def prepare_state_dir(config: Config) -> None:
    """Create ``--state-dir`` if needed; StartupError when it cannot hold the state."""
    path = config.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--state-dir {path} cannot be used: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"--state-dir {path} cannot be used: it is not writable")


@dataclass
class NodeRuntime:
    service: NodeService
    recovery: Recovery
    link_monitor: LinkMonitor
    backend: VolumeServerBackend
    closers: list[Callable[[], None]] = field(default_factory=list)

    def start_checks(self) -> list[Check]:
        """Checks that Probe waits for: recovery first, then the LINK_DEAD monitor."""

        def recover() -> str | None:
            report = self.recovery.run()
            if report.unrecoverable:
                log.warning("volumes left for restaging", extra={"volumes": report.unrecoverable})
            return None

        def monitor() -> str | None:
            self.link_monitor.start()
            self.closers.append(self.link_monitor.stop)
            return None

        return [Check("recovery", recover), Check("link_monitor", monitor)]

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def _kube_api(config: Config) -> ApiClient:
    from zerofs_csi.kube.api import make_api_client

    return make_api_client(Path(config.kubeconfig) if config.kubeconfig else None)


def _volume_server_backend(
    config: Config, metrics: Metrics, api: ApiClient | None
) -> VolumeServerBackend:
    if api is None:
        return ProcessBackend(
            config.state_dir,
            socket_root=config.socket_root,
            command=config.zerofs_command,
            hung_after=config.server_hung_timeout_seconds,
        )
    from zerofs_csi.servers.pods.backend import KubernetesBackend
    from zerofs_csi.servers.pods.owner import resolve_daemonset_owner

    owner = resolve_daemonset_owner(
        api, config.namespace, daemonset_name=config.daemonset_name or None
    )
    return KubernetesBackend(
        api,
        namespace=config.namespace,
        node_name=config.node_id,
        socket_root=config.socket_root,
        owner=owner,
        metrics=metrics,
        removal_timeout=config.server_removal_timeout_seconds,
    )


def _event_recorder(config: Config, api: ApiClient | None, component: str) -> EventRecorder:
    if api is None:
        return LogEventRecorder()
    from kubernetes import client

    host = config.node_id or os.environ.get("POD_NAME", "") or socket.gethostname()
    return KubernetesEventRecorder(client.CoreV1Api(api), component, host)


def build_node(config: Config, metrics: Metrics) -> NodeRuntime:
    prepare_state_dir(config)
    # One API client (one connection pool) for everything the node role asks the API.
    api = _kube_api(config) if config.backend is Backend.KUBERNETES else None
    if api is None:
        # Reconnects even while this process is dead or blocked; the chart runs it as a
        # container of its own for the Kubernetes backend.
        link_keeper.spawn(config.state_dir, config.log_format)
    backend = _volume_server_backend(config, metrics, api)
    attacher = NodeAttacher(nbd.NbdAttacher())
    records = RecordStore(config.state_dir)
    locks = VolumeLocks()
    stager = Stager(backend, attacher, ninep.prepare_export, records, metrics)
    recovery = Recovery(
        records,
        attacher,
        backend,
        locks,
        metrics,
        teardown=lambda record: stager.teardown(record, operation="recovery"),
    )
    events = _event_recorder(config, api, "zerofs-csi-node")
    monitor = LinkMonitor(attacher, recovery.staged_records, metrics, events=events)
    stager.watch_links(monitor.is_dead, monitor.forget)
    service = NodeService(
        config.node_id,
        config.max_volumes_per_node,
        stager,
        records,
        backend,
        attacher,
        ninep.prepare_export,
        monitor.is_dead,
        locks,
        events,
    )
    recovery.watch_state_gauges()
    runtime = NodeRuntime(service, recovery, monitor, backend)
    if api is not None:
        from zerofs_csi.node.checkpoint_requests import CheckpointRequestWorker

        # The controller's CreateSnapshot and DeleteSnapshot of volumes staged here.
        worker = CheckpointRequestWorker(
            api,
            namespace=config.namespace,
            node_name=config.node_id,
            socket_root=config.socket_root,
            locks=locks,
            is_staged=records.is_staged,
            mounted_filesystem=records.mounted_filesystem,
        )
        runtime.closers.append(worker.start().stop)
    runtime.closers.append(attacher.nbd.close)
    close_backend = getattr(backend, "close", None)
    if close_backend is not None:  # stops supervising; the servers keep running
        runtime.closers.append(close_backend)
    return runtime


def build_controller(config: Config, metrics: Metrics) -> ControllerService:
    if config.backend is Backend.LOCAL:
        prepare_state_dir(config)
        # Local state lives in one host's state directory: its one node is --node-id.
        nodes = LocalNodes([config.node_id] if config.node_id else [], config.max_volumes_per_node)
        return ControllerService(
            FileVolumeStore(config.state_dir / "volumes"),
            metrics,
            nodes=nodes,
            snapshot_store=FileSnapshotStore(config.state_dir / "snapshots"),
            checkpoints=LocalCheckpoints(
                config.state_dir,
                config.socket_root,
                [config.zerofs_command],
                # The node role's stage records, in the state directory both roles share.
                mounted_filesystem=RecordStore(config.state_dir).mounted_filesystem,
                copy_progress=metrics.report_copy,
            ),
        )
    from zerofs_csi.controller.checkpoints_kube import KubeCheckpoints
    from zerofs_csi.controller.job_pods_kube import KubeJobs
    from zerofs_csi.controller.job_sweeper import JobSweeper
    from zerofs_csi.controller.nodes_kube import CsiNodeDirectory
    from zerofs_csi.controller.snapshot_store_kube import KubernetesSnapshotStore
    from zerofs_csi.controller.store_kube import KubernetesConfigMapReader, KubernetesVolumeStore
    from zerofs_csi.servers.pods.backend import KubernetesBackend

    api = _kube_api(config)
    # The controller only removes servers (on any node): no owner, no sockets of its own.
    servers = KubernetesBackend(
        api,
        namespace=config.namespace,
        node_name=config.node_id,
        socket_root=config.socket_root,
        owner=None,
        metrics=metrics,
        removal_timeout=config.server_removal_timeout_seconds,
    )
    volumes = KubernetesVolumeStore(api, config.namespace)
    # Checkpoints of volumes staged nowhere and restores run in job pods.
    jobs = KubeJobs(api, config.namespace, config.job_image) if config.job_image else None
    checkpoints = KubeCheckpoints(
        api, config.namespace, volumes, jobs=jobs, copy_progress=metrics.report_copy
    )

    if jobs is not None and config.job_idle_timeout_seconds > 0:
        JobSweeper(checkpoints.sweep_idle_jobs, config.job_idle_timeout_seconds).start()

    def remove_volume_pods(volume_id: str) -> None:
        servers.remove_everywhere(volume_id)
        checkpoints.remove_jobs(volume_id)  # left behind by calls given up

    return ControllerService(
        volumes,
        metrics,
        nodes=CsiNodeDirectory(api, config.driver_name),
        read_config_map=KubernetesConfigMapReader(api, config.namespace),
        remove_servers=remove_volume_pods,
        events=_event_recorder(config, api, "zerofs-csi-controller"),
        snapshot_store=KubernetesSnapshotStore(api, config.namespace),
        # Taken by the node plugin where the volume is staged, asked through the API.
        checkpoints=checkpoints,
    )
