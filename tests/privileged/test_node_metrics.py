"""The plugin's real /metrics endpoint after staging a volume, and after unstaging it.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_metrics.py
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import (
    NODE_ID,
    MiB,
    PluginProcess,
    create_volume,
    mount_capability,
    stop_plugin,
)
from prometheus_client.parser import text_string_to_metric_families

from zerofs_csi.bench.plugin import free_tcp_port
from zerofs_csi.csi import csi_pb2

pytestmark = pytest.mark.privileged

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metrics_plugin(tmp_path: Path) -> Iterator[PluginProcess]:
    process = PluginProcess(
        tmp_path,
        metrics_address=f"127.0.0.1:{free_tcp_port()}",
        extra_args=("--max-volumes-per-node", "7"),
    )
    process.start()
    yield process
    stop_plugin(process)


def scrape(plugin: PluginProcess) -> Samples:
    with urllib.request.urlopen(f"http://{plugin.metrics_address}/metrics", timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have " + ", ".join(
        sorted({f"{n}{dict(lbl)}" for n, lbl in samples if n == name})
    )
    return samples[key]


def absent(samples: Samples, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) not in samples


def test_metrics_of_a_staged_volume(metrics_plugin: PluginProcess) -> None:
    plugin = metrics_plugin
    with urllib.request.urlopen(f"http://{plugin.metrics_address}/healthz", timeout=30) as reply:
        assert reply.status == 200
    info = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
    assert (info.node_id, info.max_volumes_per_node) == (NODE_ID, 7)

    volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=128 * MiB)
    volume.stage()
    samples = scrape(plugin)
    vid = volume.volume_id
    # A new volume: its export is looked for over NBD, created over 9P, then attached;
    # nothing on a just created export needs probing.
    fresh = ("ensure_server", "find_export", "create_export", "connect_nbd", "mkfs", "mount")
    for stage in fresh:
        labels = {"operation": "stage", "stage": stage, "volume_id": vid, "node": NODE_ID}
        assert value(samples, "zerofs_csi_stage_duration_seconds_count", **labels) == 1
        assert value(samples, "zerofs_csi_stage_duration_seconds_sum", **labels) > 0
    stage_labels = {"operation": "stage", "volume_id": vid, "node": NODE_ID}
    assert absent(samples, "zerofs_csi_stage_duration_seconds_count", stage="probe", **stage_labels)
    failures = [n for n, _labels in samples if n == "zerofs_csi_stage_failures_total"]
    assert not failures, "the export that was looked for and not found is no failure"
    assert value(samples, "zerofs_csi_volumes_staged", node=NODE_ID) == 1
    assert value(samples, "zerofs_csi_nbd_devices_attached", node=NODE_ID) == 1
    assert value(samples, "zerofs_csi_volume_servers_running", node=NODE_ID) == 1
    call = {"operation": "stage", "volume_id": vid, "node": NODE_ID, "code": "OK"}
    assert value(samples, "zerofs_csi_operation_duration_seconds_count", **call) == 1

    volume.unstage()
    samples = scrape(plugin)
    assert value(samples, "zerofs_csi_volumes_staged", node=NODE_ID) == 0
    assert value(samples, "zerofs_csi_nbd_devices_attached", node=NODE_ID) == 0
    assert value(samples, "zerofs_csi_volume_servers_running", node=NODE_ID) == 0
    # The volume's series went with the unstage.
    assert not [name for name, labels in samples if ("volume_id", vid) in labels]

    # Staged again: attached at once, probed, no 9P, no mkfs.
    volume.stage()
    samples = scrape(plugin)
    for stage in ("connect_nbd", "probe", "mount"):
        labels = {"stage": stage, **stage_labels}
        assert value(samples, "zerofs_csi_stage_duration_seconds_count", **labels) == 1, stage
    for stage in ("find_export", "create_export", "mkfs"):
        assert absent(
            samples, "zerofs_csi_stage_duration_seconds_count", stage=stage, **stage_labels
        )
    volume.unstage()

    with pytest.raises(grpc.RpcError) as refused:
        volume.stage(mount_capability("xfs"))  # the device holds ext4
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    samples = scrape(plugin)
    call["code"] = "FAILED_PRECONDITION"
    assert value(samples, "zerofs_csi_operation_duration_seconds_count", **call) == 1
    assert value(samples, "zerofs_csi_volumes_staged", node=NODE_ID) == 0
    assert value(samples, "zerofs_csi_nbd_devices_attached", node=NODE_ID) == 0
