"""kill -9 of the node plugin while it stages, then a restart: recovery puts the node back.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_recovery.py
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from conftest import (
    RPC_TIMEOUT_S,
    MiB,
    PluginProcess,
    connected_nbd_devices,
    create_volume,
    filesystem_uuid,
    mounts_under,
)

pytestmark = pytest.mark.privileged

SIZE = 128 * MiB
# When the kill lands, as fractions of a whole fresh stage measured first: early ones
# hit the server start and the export creation, later ones the attach, mkfs and mount.
KILL_AT = (0.1, 0.3, 0.5, 0.7, 0.9)


def index_of(device: str) -> int:
    return int(device.removeprefix("/dev/nbd"))


def test_plugin_killed_while_staging(own_plugin: PluginProcess) -> None:
    plugin = own_plugin
    baseline = connected_nbd_devices()
    timing = create_volume(plugin, plugin.workdir, fs_type="ext4", size=SIZE)
    started = time.monotonic()
    timing.stage()
    whole_stage = time.monotonic() - started
    timing.unstage()
    assert connected_nbd_devices() == baseline

    outcomes = []
    for fraction in KILL_AT:
        volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=SIZE)
        call = plugin.node.NodeStageVolume.future(volume.stage_request(), timeout=RPC_TIMEOUT_S)
        time.sleep(whole_stage * fraction)
        plugin.kill9()
        with contextlib.suppress(grpc.RpcError):
            call.result()
        record = volume.record_or_none()
        phase_at_kill = record["phase"] if record else "no record"

        plugin.start()  # returns once Probe is ready: recovery has run
        record = volume.record_or_none()
        if record is not None and record["phase"] == "staged":
            # The stage had finished: the volume stays staged and keeps its device.
            expected = baseline | {int(str(record["device_index"]))}
        else:
            expected = baseline
            assert record is None, f"an unfinished stage left its record: {record}"
            assert not volume.server_processes()
            assert not mounts_under(Path(volume.staging))
        assert connected_nbd_devices() == expected, (fraction, phase_at_kill)
        outcomes.append((fraction, phase_at_kill, record["phase"] if record else "rolled back"))

        volume.stage()
        device = volume.device()
        uuid = filesystem_uuid(device)
        target = plugin.workdir / "pods" / volume.volume_id
        volume.publish(str(target))
        payload = hashlib.sha256(volume.volume_id.encode()).digest() * (MiB // 32)
        with open(target / "data", "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
        volume.unpublish(str(target))
        volume.unstage()
        assert connected_nbd_devices() == baseline
        volume.stage()
        assert filesystem_uuid(volume.device()) == uuid
        volume.publish(str(target))
        assert (target / "data").read_bytes() == payload
        volume.unpublish(str(target))
        volume.unstage()
        assert connected_nbd_devices() == baseline

    print(f"whole stage {whole_stage:.2f} s; (kill at, record at kill, after recovery):")
    for outcome in outcomes:
        print("   ", outcome)


def test_restart_keeps_a_staged_volume(own_plugin: PluginProcess) -> None:
    plugin = own_plugin
    volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=SIZE)
    volume.stage()
    device = volume.device()
    target = plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    (target / "before").write_bytes(b"kept")
    devices = connected_nbd_devices()

    plugin.kill9()
    plugin.start()
    assert connected_nbd_devices() == devices
    assert volume.device() == device
    assert volume.record()["phase"] == "staged"
    volume.stage()  # still intact: answered from the record
    volume.publish(str(target))
    assert (target / "before").read_bytes() == b"kept"
    stats = volume.stats(str(target))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert index_of(device) in connected_nbd_devices()
