"""A volume's server killed and restarted under a writer: the workload sees no I/O error.

The process backend's supervisor restarts the killed server; the kernel reports the dead
connection with LINK_DEAD and the plugin's link monitor reconnects the device with fresh
sockets, while the writer's I/O waits.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_reconnect.py
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import MiB, VolumeFactory, wait_until

from zerofs_csi.servers.local import nbd_server_answers

pytestmark = pytest.mark.privileged

TOTAL_MIB = 24
KILL_AFTER_MIB = 4
WRITER_TIMEOUT_S = 400.0
# How long the writer waits against the server's restart is the benchmark's
# (`server_kill`, a ratio in one run); here only that it never sees an error.


def chunk(index: int) -> bytes:
    return hashlib.sha256(index.to_bytes(4, "little")).digest() * (MiB // 32)


class FsyncingWriter(threading.Thread):
    """Writes MiB after MiB, fsync after each; remembers which ones were made durable."""

    def __init__(self, path: Path, total_mib: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.path = path
        self.total_mib = total_mib
        self.synced = 0
        self.error: OSError | None = None
        self.longest_stall = 0.0

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                for index in range(self.total_mib):
                    started = time.monotonic()
                    os.pwrite(fd, chunk(index), index * MiB)
                    os.fsync(fd)
                    self.longest_stall = max(self.longest_stall, time.monotonic() - started)
                    self.synced = index + 1
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


def test_server_restart_under_fsyncing_writer(volumes: VolumeFactory) -> None:
    # Every write durable when answered: a kill loses none (test_server_crash_durability).
    volume = volumes(fs_type="ext4", size=128 * MiB, parameters={"syncWrites": "true"})
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    first_pid = volume.server_pid()
    assert first_pid is not None, volume.server_processes()

    writer = FsyncingWriter(target / "data", TOTAL_MIB)
    writer.start()
    wait_until(lambda: writer.synced >= KILL_AFTER_MIB or not writer.is_alive(), 120, "writes")
    assert writer.error is None, writer.error
    # ZeroFS is one process: a kill -9 drops its connections with no reply. The stand-in
    # is a group (its nbdkit and diod run in its session), so the whole group dies at once.
    # Killing only the stand-in would let nbdkit shut down gracefully and answer the
    # requests in flight with NBD_ESHUTDOWN, which the kernel turns into EIO.
    assert os.getpgid(first_pid) == first_pid
    os.killpg(first_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    killed_after = writer.synced
    # While the link is down the volume reports an abnormal condition.
    wait_until(
        lambda: volume.stats(str(target)).volume_condition.abnormal, 60, "an abnormal condition"
    )
    second_pid = wait_until(
        lambda: (pid := volume.server_pid()) not in (None, first_pid) and pid, 60, "a restart"
    )
    # Restarted means answering NBD: the stand-in starts diod first, which can take
    # seconds under load.
    nbd_socket = volume.plugin.state_dir / "sockets" / volume.volume_id / "nbd.sock"
    wait_until(lambda: nbd_server_answers(nbd_socket, 1.0), 120, "the new server to answer")
    restarted_in = time.monotonic() - killed_at

    writer.join(WRITER_TIMEOUT_S)
    assert not writer.is_alive(), f"writer stuck after {writer.synced} MiB"
    assert writer.error is None, f"I/O error after {writer.synced} MiB: {writer.error}"
    assert writer.synced == TOTAL_MIB
    assert killed_after < TOTAL_MIB, "the server died after the writer was done"
    stats = volume.stats(str(target))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert "reconnected" in volume.plugin.log_path.read_text(errors="replace")

    # Read back through a fresh device: nothing comes from the page cache.
    volume.unpublish(str(target))
    volume.unstage()
    volume.stage()
    volume.publish(str(target))
    with open(target / "data", "rb") as f:
        for index in range(TOTAL_MIB):
            assert f.read(MiB) == chunk(index), f"MiB {index} differs"
    reconnects = [
        line
        for line in volume.plugin.log_path.read_text(errors="replace").splitlines()
        if "reconnected" in line
    ]
    print(
        f"server {first_pid} killed after {killed_after} MiB, restarted as {second_pid} in "
        f"{restarted_in:.2f} s; longest write+fsync {writer.longest_stall:.2f} s; "
        f"{reconnects[-1]}"
    )
