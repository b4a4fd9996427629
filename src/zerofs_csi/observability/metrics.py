"""Prometheus metrics of the driver.

Every series carries ``node`` (empty for the controller) and, where it is about one
volume, ``volume_id``: a valid volume id, or ``invalid`` for a call about none (a
malformed id, or a CreateVolume name that is no id and made no volume). A volume's
series go when the node unstages it and when the controller deletes it, with the
samples of that last call: the plugin log keeps it. Failure reasons are bounded: a gRPC
status name or an errno name.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from zerofs_csi.errors import CsiError, InvalidArgument
from zerofs_csi.volume.id import validate_volume_id

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

# The calls after which a volume is gone from this plugin's view.
ENDING_CALLS = frozenset({"NodeUnstageVolume", "DeleteVolume"})

# The volume label of calls about no valid volume id.
INVALID_VOLUME = "invalid"


def volume_label(volume_id: str) -> str:
    """``volume_id`` if it is a valid volume id, else INVALID_VOLUME: the text of a
    request never becomes a series of its own."""
    try:
        return validate_volume_id(volume_id)
    except InvalidArgument:
        return INVALID_VOLUME


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
            "Reconnections of dead NBD links, by result (ok, failed, writes_lost: a device "
            "disconnected because its server may have lost writes it answered).",
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
        self.copy_progress = Gauge(
            "zerofs_csi_volume_copy_progress_percent",
            "How much of a restore's or clone's data is copied into its new volume, while "
            "the copy runs.",
            ("volume_id", "node"),
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
        volume = volume_label(volume_id)
        start = time.monotonic()
        try:
            yield timing
        except BaseException as exc:
            self.stage_failures.labels(
                operation, timing.stage, volume, self.node, failure_reason(exc)
            ).inc()
            raise
        finally:
            elapsed = time.monotonic() - start
            self.stage_seconds.labels(operation, timing.stage, volume, self.node).observe(elapsed)

    def observe_call(
        self, method: str, volume_id: str, seconds: float, code: grpc.StatusCode, reason: str
    ) -> None:
        """Interceptor observer: one histogram sample per CSI operation about a volume;
        after a successful unstage or delete, the volume's series go."""
        operation = OPERATIONS.get(method)
        if operation is None:
            return
        volume = volume_label(volume_id)
        self.operation_seconds.labels(operation, volume, self.node, code.name).observe(seconds)
        if method in ENDING_CALLS and code is grpc.StatusCode.OK and volume != INVALID_VOLUME:
            self.forget(volume)

    def report_copy(self, volume_id: str, percent: int | None) -> None:
        """The copy into new volume ``volume_id`` is ``percent`` done; None: it ended."""
        volume = volume_label(volume_id)
        if percent is None:
            self.copy_progress.remove_by_labels({"volume_id": volume})
        else:
            self.copy_progress.labels(volume, self.node).set(percent)

    def forget(self, volume_id: str) -> None:
        """Remove every series about ``volume_id``."""
        for metric in (self.operation_seconds, self.stage_seconds, self.stage_failures):
            metric.remove_by_labels({"volume_id": volume_id})
