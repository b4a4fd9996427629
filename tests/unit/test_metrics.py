"""Metrics: stage timing, bounded failure reasons, the HTTP endpoint."""

from __future__ import annotations

import errno
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from zerofs_csi.errors import Aborted, InvalidArgument
from zerofs_csi.metrics import Metrics, failure_reason
from zerofs_csi.metrics_http import MetricsServer
from zerofs_csi.readiness import Check, Readiness
from zerofs_csi.recovery import when_scraped


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (InvalidArgument("bad"), "INVALID_ARGUMENT"),
        (Aborted("busy"), "ABORTED"),
        (OSError(errno.EBUSY, "busy"), "EBUSY"),
        (FileNotFoundError(errno.ENOENT, "gone"), "ENOENT"),
        (TimeoutError(), "ETIMEDOUT"),
        (ValueError("free text that must not become a label"), "INTERNAL"),
    ],
)
def test_failure_reason_is_bounded(exc: BaseException, reason: str) -> None:
    assert failure_reason(exc) == reason


def test_stage_records_duration_and_failures() -> None:
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    with metrics.stage("stage", "mkfs", "pvc-1"):
        pass
    with pytest.raises(OSError), metrics.stage("stage", "connect_nbd", "pvc-1"):
        raise OSError(errno.ENOENT, "nbd module not loaded")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    base = {"operation": "stage", "volume_id": "pvc-1", "node": "node-a"}
    assert value("zerofs_csi_stage_duration_seconds_count", stage="mkfs", **base) == 1
    assert value("zerofs_csi_stage_duration_seconds_count", stage="connect_nbd", **base) == 1
    assert value("zerofs_csi_mkfs_duration_seconds_count", volume_id="pvc-1", node="node-a") == 1
    # A failed connect is a failure, not a connect latency sample.
    assert (
        value("zerofs_csi_nbd_connect_duration_seconds_count", volume_id="pvc-1", node="node-a")
        is None
    )
    assert (
        value("zerofs_csi_stage_failures_total", stage="connect_nbd", reason="ENOENT", **base) == 1
    )
    assert value("zerofs_csi_stage_failures_total", stage="mkfs", reason="ENOENT", **base) is None


def test_a_stage_renamed_by_its_body_is_recorded_under_the_new_name() -> None:
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    with metrics.stage("stage", "connect_nbd", "pvc-1") as timing:
        timing.stage = "find_export"  # what the attempt turned out to be

    base = {"operation": "stage", "volume_id": "pvc-1", "node": "node-a"}
    assert (
        registry.get_sample_value(
            "zerofs_csi_stage_duration_seconds_count", {"stage": "find_export", **base}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "zerofs_csi_stage_duration_seconds_count", {"stage": "connect_nbd", **base}
        )
        is None
    )
    connects = {"volume_id": "pvc-1", "node": "node-a"}
    assert (
        registry.get_sample_value("zerofs_csi_nbd_connect_duration_seconds_count", connects) is None
    )


def test_observe_call_labels_operation_and_code() -> None:
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    metrics.observe_call("NodeStageVolume", "pvc-1", 0.2, grpc.StatusCode.ABORTED, "ABORTED")
    metrics.observe_call("Probe", "", 0.001, grpc.StatusCode.OK, "OK")  # not a volume operation
    labels = {"operation": "stage", "volume_id": "pvc-1", "node": "node-a", "code": "ABORTED"}
    assert registry.get_sample_value("zerofs_csi_operation_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("zerofs_csi_operation_duration_seconds_sum", labels) == 0.2


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoint_serves_metrics_and_health() -> None:
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    metrics.volumes_staged.labels("node-a").set(3)
    problems = iter(["nbd module not loaded: modprobe nbd", None])
    readiness = Readiness([Check("nbd", lambda: next(problems))])
    server = MetricsServer("127.0.0.1:0", readiness, registry)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/healthz") == (503, "pending\n")
        readiness.run_checks()
        assert _get(f"{base}/healthz") == (503, "nbd module not loaded: modprobe nbd\n")
        readiness.run_checks()
        assert _get(f"{base}/healthz") == (200, "ok\n")
        status, body = _get(f"{base}/metrics")
        assert status == 200
        assert 'zerofs_csi_volumes_staged{node="node-a"} 3.0' in body
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        server.stop()


def _broken_count() -> int:
    raise OSError(errno.EIO, "netlink went away")


@pytest.mark.parametrize(
    ("count", "expected"),
    [(lambda: 3, "3.0"), (lambda: 0, "0.0"), (_broken_count, "NaN")],
)
def test_state_gauges_are_computedwhen_scraped(
    count: Callable[[], int], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    metrics.volumes_staged.labels("node-a").set_function(when_scraped("volumes_staged", count))

    body = generate_latest(registry).decode()

    assert f'zerofs_csi_volumes_staged{{node="node-a"}} {expected}' in body
    assert ("computing a gauge failed" in caplog.text) == (expected == "NaN")
