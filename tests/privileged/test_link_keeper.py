"""The link keeper reconnects a device while the node plugin is dead.

The plugin (local backend) starts the keeper, a process of its own. With the plugin
killed, the volume's server is killed too and started again by another supervisor (as
kubelet restarts a server pod); the keeper alone reconnects the device and the writer
carries on, before any plugin runs again.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_link_keeper.py
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import STANDIN, MiB, PluginProcess, create_volume, processes_mentioning, wait_until

from zerofs_csi.servers.local import ProcessBackend

pytestmark = pytest.mark.privileged

RESUME_TIMEOUT_S = 90.0


class Writer(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name="writer", daemon=True)
        self.path = path
        self.written = 0
        self.error: OSError | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        data = os.urandom(MiB)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while not self.stopping.is_set():
                    os.pwrite(fd, data, (self.written % 32) * MiB)
                    os.fsync(fd)
                    self.written += 1
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


def test_keeper_reconnects_while_the_plugin_is_dead(own_plugin: PluginProcess) -> None:
    keeper = f"zerofs_csi.link_keeper --state-dir {own_plugin.state_dir} "
    wait_until(lambda: processes_mentioning(keeper), 60, "the plugin to start the link keeper")
    volume = create_volume(
        own_plugin,
        own_plugin.workdir,
        fs_type="ext4",
        size=128 * MiB,
        parameters={"syncWrites": "true"},  # a kill loses no write it answered
    )
    volume.stage()
    target = own_plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    writer = Writer(target / "data")
    writer.start()
    wait_until(lambda: writer.written >= 4 or writer.error, 120, "writes")

    own_plugin.kill9()
    server = [pid for pid, argv in volume.server_processes() if "zerofs" in argv]
    assert len(server) == 1, volume.server_processes()
    os.killpg(server[0], signal.SIGKILL)
    # Another supervisor brings the server back, as kubelet would a pod; it reconnects
    # nothing itself.
    supervisor = ProcessBackend(own_plugin.state_dir, command=[str(STANDIN)])
    try:
        killed_at = time.monotonic()
        before = writer.written
        wait_until(
            lambda: writer.written > before + 4 or writer.error,
            RESUME_TIMEOUT_S,
            "the writer to carry on with the plugin dead",
        )
        resumed_in = time.monotonic() - killed_at
        assert writer.error is None, writer.error
        assert not own_plugin.running
        log = (own_plugin.state_dir / "link-keeper.log").read_text()
        assert "reconnected" in log, log[-2000:]
        print(f"writer carried on {resumed_in:.2f} s after the server kill, no plugin running")
    finally:
        writer.stopping.set()
        writer.join(120)
        supervisor.close()
    own_plugin.start()
