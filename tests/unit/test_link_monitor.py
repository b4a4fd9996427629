"""The link monitor's dispatch: a LINK_DEAD that arrives while the volume's reconnect runs
gets a reconnect of its own. The kernel's side (LINK_DEAD, RECONFIGURE) is stood in for
by a scripted listener and attacher: the host kernel has no NBD; the privileged tests
run the real one."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from zerofs_csi.bench.plugin import wait_until
from zerofs_csi.node.link_monitor import LinkMonitor
from zerofs_csi.node.stage_record import StageRecord
from zerofs_csi.observability.metrics import Metrics

RECORD = StageRecord(
    volume_id="pvc-1",
    backend_id="zerofs-csi:pvc-1",
    device_index=3,
    size_bytes=1 << 20,
    access_type="mount",
    fs_type="ext4",
    server_backend="local",
    nbd_socket="/run/pvc-1/nbd.sock",
    staging_path="/staging/pvc-1",
)


class ScriptedListener:
    def __init__(self) -> None:
        self.events: list[tuple[int, str | None]] = []
        self.lock = threading.Lock()

    def push(self, index: int, backend_id: str) -> None:
        with self.lock:
            self.events.append((index, backend_id))

    def receive(self, timeout_s: float) -> list[tuple[int, str | None]]:
        with self.lock:
            events, self.events = self.events, []
        if not events:
            time.sleep(min(timeout_s, 0.01))
        return events

    def close(self) -> None:
        pass


class ScriptedAttacher:
    """Counts RECONFIGUREs; the first one waits for ``gate``."""

    def __init__(self, listener: ScriptedListener) -> None:
        self.listener = listener
        self.nbd = self
        self.calls = 0
        self.first_started = threading.Event()
        self.gate = threading.Event()

    def link_dead_listener(self) -> ScriptedListener:
        return self.listener

    def reconnect(self, *args: object) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first_started.set()
            assert self.gate.wait(10)


def test_link_dead_during_a_reconnect_gets_a_reconnect_of_its_own() -> None:
    listener = ScriptedListener()
    attacher = ScriptedAttacher(listener)
    metrics = Metrics("node-a", CollectorRegistry())
    monitor = LinkMonitor(attacher, lambda: {RECORD.volume_id: RECORD}, metrics)  # type: ignore[arg-type]
    monitor.start()  # reconnects every staged volume once: the first RECONFIGURE
    try:
        assert attacher.first_started.wait(10)
        # Another connection of the device dies while that RECONFIGURE is under way: its
        # socket was alive when the RECONFIGURE was sent, so it needs one more.
        listener.push(RECORD.device_index, RECORD.backend_id)
        time.sleep(0.2)
        attacher.gate.set()
        wait_until(
            lambda: attacher.calls == 2 and not monitor.is_dead(RECORD.volume_id),
            10.0,
            "the second reconnect",
        )
        time.sleep(0.2)
        assert attacher.calls == 2
    finally:
        monitor.stop()
