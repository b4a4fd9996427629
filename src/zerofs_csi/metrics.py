"""Prometheus metrics of the driver.

Every series carries ``node`` (empty for the controller) and, where it is about one
volume, ``volume_id``. Failure reasons are bounded: a gRPC status name or an errno name.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from zerofs_csi.errors import CsiError

# From a millisecond netlink round trip to a ten-minute mkfs or pod start.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

# CSI method -> the short operation name used in labels.
OPERATIONS = {
    "CreateVolume": "create",
    "DeleteVolume": "delete",
    "ControllerPublishVolume": "controller_publish",
    "ControllerUnpublishVolume": "controller_unpublish",
    "ControllerExpandVolume": "controller_expand",
    "ValidateVolumeCapabilities": "validate",
    "NodeStageVolume": "stage",
    "NodeUnstageVolume": "unstage",
    "NodePublishVolume": "publish",
    "NodeUnpublishVolume": "unpublish",
    "NodeExpandVolume": "expand",
    "NodeGetVolumeStats": "stats",
}

# Stages that also get a dedicated histogram, as operators asked for them by name.
_DEDICATED = {"mount": "mount", "connect_nbd": "nbd_connect", "mkfs": "mkfs"}


def failure_reason(exc: BaseException) -> str:
    """A bounded label for why something failed."""
    if isinstance(exc, CsiError):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "EUNKNOWN")
    if isinstance(exc, TimeoutError):
        return "ETIMEDOUT"
    return grpc.StatusCode.INTERNAL.name


@dataclass
class StageTiming:
    stage: str


class Metrics:
    def __init__(self, node: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.node = node
        volume_labels = ("operation", "volume_id", "node")
        self.operation_seconds = Histogram(
            "zerofs_csi_operation_duration_seconds",
            "Duration of CSI operations, by outcome.",
            (*volume_labels, "code"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "zerofs_csi_stage_duration_seconds",
            "Duration of one stage of a CSI operation (successful or not).",
            ("operation", "stage", "volume_id", "node"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.stage_failures = Counter(
            "zerofs_csi_stage_failures_total",
            "Failed stages of CSI operations.",
            ("operation", "stage", "volume_id", "node", "reason"),
            registry=registry,
        )
        self.dedicated = {
            stage: Histogram(
                f"zerofs_csi_{name}_duration_seconds",
                f"Duration of successful {name.replace('_', ' ')} steps.",
                ("volume_id", "node"),
                buckets=DURATION_BUCKETS,
                registry=registry,
            )
            for stage, name in _DEDICATED.items()
        }
        self.nbd_devices = Gauge(
            "zerofs_csi_nbd_devices_attached",
            "NBD devices attached by this driver on the node.",
            ("node",),
            registry=registry,
        )
        self.nbd_dead_links = Gauge(
            "zerofs_csi_nbd_dead_links",
            "NBD devices of this driver whose connection the kernel reported dead.",
            ("node",),
            registry=registry,
        )
        self.volumes_staged = Gauge(
            "zerofs_csi_volumes_staged",
            "Volumes staged on the node.",
            ("node",),
            registry=registry,
        )
        self.servers_running = Gauge(
            "zerofs_csi_volume_servers_running",
            "Per-volume ZeroFS servers running for this node.",
            ("node",),
            registry=registry,
        )
        self.reconnects = Counter(
            "zerofs_csi_nbd_reconnects_total",
            "Reconnections of dead NBD links, by result (ok, failed).",
            ("node", "result"),
            registry=registry,
        )
        self.forced_pod_deletions = Counter(
            "zerofs_csi_forced_pod_deletions_total",
            "Per-volume server pods deleted with grace period 0 after the graceful timeout.",
            ("node",),
            registry=registry,
        )
        self.server_removals = Counter(
            "zerofs_csi_server_removals_total",
            "Removals of per-volume servers, by outcome (graceful, forced, absent, failed).",
            ("node", "outcome"),
            registry=registry,
        )
        self.orphans_detached = Counter(
            "zerofs_csi_orphans_detached_total",
            "NBD devices of this driver detached at start because no volume was staged.",
            ("node",),
            registry=registry,
        )
        self.s3_objects_deleted = Counter(
            "zerofs_csi_s3_objects_deleted_total",
            "Objects deleted from the object store by deleteDataOnPVCDelete.",
            ("node",),
            registry=registry,
        )

    @contextmanager
    def stage(self, operation: str, stage: str, volume_id: str) -> Iterator[StageTiming]:
        """Time one stage; on an exception count the failure with a bounded reason. The
        body may rename the stage it turned out to be through the yielded timing."""
        timing = StageTiming(stage)
        start = time.monotonic()
        try:
            yield timing
        except BaseException as exc:
            self.stage_failures.labels(
                operation, timing.stage, volume_id, self.node, failure_reason(exc)
            ).inc()
            raise
        finally:
            elapsed = time.monotonic() - start
            self.stage_seconds.labels(operation, timing.stage, volume_id, self.node).observe(
                elapsed
            )
        if timing.stage in self.dedicated:
            self.dedicated[timing.stage].labels(volume_id, self.node).observe(elapsed)

    def observe_call(
        self, method: str, volume_id: str, seconds: float, code: grpc.StatusCode, reason: str
    ) -> None:
        """Interceptor observer: one histogram sample per CSI operation about a volume."""
        operation = OPERATIONS.get(method)
        if operation is None:
            return
        self.operation_seconds.labels(operation, volume_id, self.node, code.name).observe(seconds)
