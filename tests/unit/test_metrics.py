"""Metrics: stage timing, bounded failure reasons, the HTTP endpoint."""

from __future__ import annotations

import errno
import gzip
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from zerofs_csi.cli import parse_config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.errors import Aborted, InvalidArgument
from zerofs_csi.node.recovery import when_scraped
from zerofs_csi.observability.metrics import INVALID_VOLUME, Metrics, failure_reason
from zerofs_csi.observability.metrics_http import MetricsServer
from zerofs_csi.observability.readiness import Check, Readiness
from zerofs_csi.server import Plugin, build


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


# -- the running plugin: its gRPC socket and its HTTP endpoint --------------------------

HOSTILE_IDS = ["", "pvc\x00x", "pvc-1\n", "../x", "PVC-Upper", "p" * (1 << 20)]
CAPABILITY = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


@dataclass
class Served:
    plugin: Plugin
    http: MetricsServer
    channel: grpc.Channel
    store: Path

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def scrape(self) -> str:
        status, body = _get(f"{self.url}/metrics")
        assert status == 200
        return body

    def create(self, name: str) -> csi_pb2.CreateVolumeResponse:
        return self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                volume_capabilities=[CAPABILITY],
                parameters={"storageUrl": f"file://{self.store}"},
            ),
            timeout=30,
        )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The plugin as ``run`` wires it (both roles, local backend), with its /metrics."""
    config = parse_config(
        [
            "--role", "all", "--node-id", "node-a", "--backend", "local",
            "--endpoint", f"unix://{tmp_path}/csi.sock", "--metrics-address", "",
            "--state-dir", str(tmp_path / "state"), "--zerofs-command", "/bin/false",
        ]
    )  # fmt: skip
    plugin = build(config, checks=[])
    plugin.server.start()
    http = MetricsServer("127.0.0.1:0", plugin.readiness, plugin.registry)
    http.start()
    channel = grpc.insecure_channel(f"unix://{plugin.socket_path}")
    try:
        yield Served(plugin, http, channel, tmp_path / "store")
    finally:
        channel.close()
        http.stop()
        plugin.server.stop(grace=None).wait()
        plugin.close()


def volume_labels(body: str) -> set[str]:
    """Every value of a ``volume_id`` label in an exposition."""
    return {
        sample.labels["volume_id"]
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if "volume_id" in sample.labels
    }


def call_fails(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


def test_only_valid_volume_ids_become_labels(served: Served, tmp_path: Path) -> None:
    staging = str(tmp_path / "staging")
    created = set()
    for bad in HOSTILE_IDS:
        # A name is no id: CreateVolume maps the names the spec allows to ids.
        try:
            created.add(served.create(bad).volume.volume_id)
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
        calls: list[tuple[Callable[..., object], object]] = [
            (served.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=bad)),
            (
                served.node.NodeStageVolume,
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=bad, staging_target_path=staging, volume_capability=CAPABILITY
                ),
            ),
            (
                served.node.NodeUnstageVolume,
                csi_pb2.NodeUnstageVolumeRequest(volume_id=bad, staging_target_path=staging),
            ),
            (
                served.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=staging),
            ),
        ]
        for method, request in calls:
            assert call_fails(partial(method, request, timeout=30)) is (
                grpc.StatusCode.INVALID_ARGUMENT
            )
    created.add(served.create("pvc-good").volume.volume_id)

    body = served.scrape()
    assert len(body) < 64 * 1024, f"/metrics is {len(body)} bytes"
    assert volume_labels(body) == {INVALID_VOLUME, *created}
    assert not set(HOSTILE_IDS) & created
    refused = {"volume_id": INVALID_VOLUME, "node": "node-a", "code": "INVALID_ARGUMENT"}
    counts = [
        served.plugin.registry.get_sample_value(
            "zerofs_csi_operation_duration_seconds_count", {"operation": operation, **refused}
        )
        for operation in ("delete", "stage", "unstage", "stats")
    ]
    assert counts == [len(HOSTILE_IDS)] * 4


def test_a_volumes_series_go_when_it_is_deleted(served: Served, tmp_path: Path) -> None:
    """(Unstaging takes the kernel's NBD: tests/privileged/test_node_metrics.py.)"""
    deleted, kept = (served.create(n).volume.volume_id for n in ("pvc-a", "pvc-b"))
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=deleted,
        staging_target_path=str(tmp_path / "staging"),
        volume_capability=CAPABILITY,
        volume_context={"storageUrl": f"file://{served.store}", "capacityBytes": str(1 << 30)},
        secrets={"ZEROFS_ENCRYPTION_PASSWORD": "metrics-test-password"},
    )
    # The server command exits at once: the stage fails at its first step.
    assert call_fails(lambda: served.node.NodeStageVolume(stage, timeout=60)) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    body = served.scrape()
    assert volume_labels(body) == {deleted, kept}
    assert f'stage="ensure_server",volume_id="{deleted}"' in body

    served.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=deleted), timeout=30)
    assert volume_labels(served.scrape()) == {kept}


def test_each_duration_is_one_histogram() -> None:
    """Stage timings are ``stage_duration_seconds{stage}`` only: no second histogram
    repeating the mount, NBD connect or mkfs stages."""
    registry = CollectorRegistry()
    Metrics("node-a", registry)
    histograms = {f.name for f in registry.collect() if f.type == "histogram"}
    assert histograms == {
        "zerofs_csi_operation_duration_seconds",
        "zerofs_csi_stage_duration_seconds",
    }


OPENMETRICS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)  # what Prometheus sends


def test_the_scraper_chooses_the_format(served: Served) -> None:
    served.create("pvc-a")

    def get(**headers: str) -> tuple[str, bytes]:
        request = urllib.request.Request(f"{served.url}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers.get("Content-Type", ""), response.read()

    content_type, body = get(Accept=OPENMETRICS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    families = {f.name for f in openmetrics_families(body.decode())}
    assert "zerofs_csi_operation_duration_seconds" in families

    content_type, body = get()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in body and b"zerofs_csi_operation_duration_seconds_count{" in body

    content_type, body = get(**{"Accept-Encoding": "gzip"})
    assert b"zerofs_csi_volumes_staged" in gzip.decompress(body)

    assert _get(f"{served.url}/healthz") == (200, "ok\n")
    assert _get(f"{served.url}/metrics/extra")[0] == 404
