"""kill -9 of the node plugin while it stages, then a restart: recovery puts the node back.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_recovery.py
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    RPC_TIMEOUT_S,
    MiB,
    Mode,
    PluginProcess,
    Volume,
    assert_nbd_devices,
    block_capability,
    connected_nbd_devices,
    create_volume,
    filesystem_uuid,
    mounts_under,
    settled_nbd_devices,
    wait_until,
)

from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd

pytestmark = pytest.mark.privileged

SIZE = 128 * MiB


def kill_points(plugin: PluginProcess) -> dict[str, Callable[[Volume], bool]]:
    """When to kill the plugin during a fresh stage, from the outside: each condition
    becomes true at the start of one step and is polled until it does."""
    return {
        "server starting": lambda v: bool(v.server_processes()),
        "attached, probing": lambda v: (Path(v.staging) / "zerofs-volume.json").exists(),
        "mkfs running": lambda v: (plugin.state_dir / "formatting" / v.volume_id).exists(),
        "mounted": lambda v: bool(mounts_under(Path(v.staging))),
    }


def test_plugin_killed_while_staging(own_plugin: PluginProcess) -> None:
    plugin = own_plugin
    baseline = settled_nbd_devices()
    outcomes = []
    for name, reached in kill_points(plugin).items():
        volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=SIZE)
        call = plugin.node.NodeStageVolume.future(volume.stage_request(), timeout=RPC_TIMEOUT_S)
        wait_until(lambda: reached(volume) or call.done(), RPC_TIMEOUT_S, name, 0.002)  # noqa: B023
        finished = call.done()
        plugin.kill9()
        assert not finished or call.exception() is None, (name, call.exception())
        record = volume.record_or_none()
        at_kill = f"{'finished' if finished else 'running'}, record " + (
            str(record["phase"]) if record else "none"
        )

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
        assert_nbd_devices(expected, f"{name} ({at_kill})")
        outcomes.append((name, at_kill, str(record["phase"]) if record else "rolled back"))

        volume.stage()
        if name == "mkfs running":  # the half-made filesystem is ours: made again, not refused
            assert "formatting again after an interrupted mkfs" in plugin.log_tail(400)
        uuid = filesystem_uuid(volume.device())
        target = plugin.workdir / "pods" / volume.volume_id
        volume.publish(str(target))
        payload = hashlib.sha256(volume.volume_id.encode()).digest() * (MiB // 32)
        with open(target / "data", "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
        volume.unpublish(str(target))
        volume.unstage()
        assert_nbd_devices(baseline)
        volume.stage()
        assert filesystem_uuid(volume.device()) == uuid
        volume.publish(str(target))
        assert (target / "data").read_bytes() == payload
        volume.unpublish(str(target))
        volume.unstage()
        assert_nbd_devices(baseline)

    print("(killed when, state at kill, after recovery):")
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
    devices = settled_nbd_devices()

    plugin.kill9()
    plugin.start()
    assert_nbd_devices(devices)
    assert volume.device() == device
    assert volume.record()["phase"] == "staged"
    volume.stage()  # still intact: answered from the record
    volume.publish(str(target))
    assert (target / "before").read_bytes() == b"kept"
    stats = volume.stats(str(target))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert int(device.removeprefix("/dev/nbd")) in connected_nbd_devices()


def test_a_read_only_stage_comes_back_read_only(own_plugin: PluginProcess) -> None:
    """A ReadOnlyMany device that went while the plugin was down is attached again as
    its stage attached it: read-only and without flushes, which ZeroFS's read-only
    servers fail."""
    plugin = own_plugin
    volume = create_volume(plugin, plugin.workdir, block=True, size=SIZE)
    volume.stage()
    payload = os.urandom(MiB)
    with open(volume.device(), "r+b") as device:
        device.write(payload)
        os.fsync(device.fileno())
    volume.unstage()
    many = block_capability(Mode.MULTI_NODE_READER_ONLY)
    volume.stage(many)

    plugin.kill9()
    attacher = nbd.NbdAttacher()
    try:
        gone = int(str(volume.record()["device_index"]))
        attacher.detach(gone, f"zerofs-csi:{volume.volume_id}")
    finally:
        attacher.close()
    assert gone not in connected_nbd_devices()
    plugin.start()
    index = int(volume.device().removeprefix("/dev/nbd"))
    assert index in connected_nbd_devices()
    assert _nbd.read_sysfs(index, "ro") == "1"
    assert _nbd.read_sysfs(index, "queue/write_cache") == "write through"
    with open(volume.device(), "rb") as device:
        assert device.read(MiB) == payload
    volume.unstage()


def test_plugin_and_server_killed_together(own_plugin: PluginProcess) -> None:
    """The server restarts while no plugin listens for LINK_DEAD: the restarted plugin
    must still reconnect the device before its dead-connection timeout fails the I/O
    (a volume whose writes are durable when answered: a kill loses none)."""
    plugin = own_plugin
    volume = create_volume(
        plugin, plugin.workdir, fs_type="ext4", size=SIZE, parameters={"syncWrites": "true"}
    )
    volume.stage()
    target = plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    (target / "before").write_bytes(b"before")
    os.sync()
    servers = [pid for pid, argv in volume.server_processes() if "zerofs" in argv]
    assert len(servers) == 1, volume.server_processes()

    plugin.kill9()
    os.killpg(servers[0], signal.SIGKILL)
    wait_until(lambda: not volume.server_processes(), 30, "the server to die")
    log_start = len(plugin.log_path.read_bytes())
    plugin.start()

    errors: list[OSError] = []
    payload = os.urandom(2 * MiB)

    def write() -> None:
        try:
            with open(target / "after", "wb") as f:
                f.write(payload)
                os.fsync(f.fileno())
        except OSError as exc:
            errors.append(exc)

    started = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    # Requests in flight at the kill are resent at the kernel's next look after the
    # reconnect; new ones wait for the reconnect. Either way well before the
    # dead-connection timeout (300 s).
    writer.join(250)
    assert not writer.is_alive(), "write still blocked"
    assert not errors, errors
    took = time.monotonic() - started
    log = plugin.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert "reconnected" in log

    volume.unpublish(str(target))
    volume.unstage()
    volume.stage()
    volume.publish(str(target))
    assert (target / "before").read_bytes() == b"before"
    assert (target / "after").read_bytes() == payload
    print(f"write after the restart of plugin and server took {took:.2f} s")


def test_recovery_detaches_only_our_orphans(own_plugin: PluginProcess, tmp_path: Path) -> None:
    """At start the plugin detaches devices tagged as ours whose volume is not staged,
    and never touches a device somebody else attached."""
    sock = str(tmp_path / "memory.sock")
    server = subprocess.Popen(
        ["nbdkit", "--foreground", "--unix", sock, "memory", "64M"], stderr=subprocess.DEVNULL
    )
    attacher = nbd.NbdAttacher()
    foreign_id, orphan_id = "someone-else:disk", "zerofs-csi:pvc-ghost"
    attached: list[tuple[int, str]] = []
    try:
        wait_until(lambda: os.path.exists(sock), 30, "nbdkit")
        foreign = attacher.attach(sock, "", foreign_id, connections=1)
        attached.append((foreign.index, foreign_id))
        orphan = attacher.attach(sock, "", orphan_id, connections=1)
        attached.append((orphan.index, orphan_id))
        own_plugin.kill9()
        own_plugin.start()
        wait_until(lambda: orphan.index not in connected_nbd_devices(), 15, "the orphan to go")
        assert foreign.index in connected_nbd_devices()
        backend = Path(f"/sys/block/nbd{foreign.index}/backend").read_text().strip()
        assert backend == foreign_id
        assert f"nbd{orphan.index}" in own_plugin.log_tail(400)
    finally:
        for index, backend_id in attached:
            with contextlib.suppress(OSError):
                attacher.detach(index, backend_id)
        attacher.close()
        server.kill()
        server.wait()
