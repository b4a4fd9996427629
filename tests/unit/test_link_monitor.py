"""The link monitor's dispatch: a LINK_DEAD that arrives while the volume's reconnect runs
gets a reconnect of its own; a device whose server may have lost its writes is
disconnected instead of reconnected. The kernel's side (LINK_DEAD, RECONFIGURE) is stood
in for by a scripted listener and attacher: the host kernel has no NBD; the privileged
tests run the real one."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
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
        self.reconfigured = 0
        self.detached: list[tuple[int, str]] = []
        # Run inside a reconnect, between its handshake and its RECONFIGURE.
        self.during_handshake: Callable[[], None] = lambda: None

    def link_dead_listener(self) -> ScriptedListener:
        return self.listener

    def reconnect(
        self, *args: object, before_reconfigure: Callable[[], None] | None = None
    ) -> None:
        self.calls += 1
        if self.calls == 1:
            self.first_started.set()
            assert self.gate.wait(10)
        self.during_handshake()
        if before_reconfigure is not None:
            before_reconfigure()
        self.reconfigured += 1

    def detach(self, index: int, backend_id: str) -> None:
        self.detached.append((index, backend_id))


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


class RecordedEvents:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, str, str]] = []

    def warning(self, volume_id: str, reason: str, message: str, context: object) -> None:
        self.warnings.append((volume_id, reason, message))

    def normal(self, volume_id: str, reason: str, message: str, context: object) -> None:
        raise AssertionError("no normal event expected")


# Lines of a server's lives file (servers.lives) after the device was attached to life 1.
CLEAN_RESTART = "start 1\nexit 2 0\nstart 3\n"
KILLED = "start 1\nexit 2 137\nstart 3\n"
KILLED_UNSEEN = "start 1\nstart 3\n"


@pytest.mark.parametrize(
    ("lives", "attached_life", "record_changes", "lost"),
    [
        pytest.param("start 1\n", 1, {}, False, id="the same server: a connection blip"),
        pytest.param(CLEAN_RESTART, 1, {}, False, id="graceful shutdown, then a new server"),
        pytest.param(KILLED, 1, {}, True, id="server killed"),
        pytest.param(KILLED_UNSEEN, 1, {}, True, id="server gone with no exit recorded"),
        pytest.param("start 1\nexit 2 unknown\nstart 3\n", 1, {}, True, id="exit unseen"),
        pytest.param(KILLED, 1, {"sync_writes": True}, False, id="syncWrites"),
        pytest.param(KILLED, 1, {"read_only_device": True}, False, id="read-only device"),
        pytest.param(KILLED + "exit 4 0\nstart 5\n", 3, {}, False, id="killed before attach"),
        pytest.param(KILLED, 0, {}, True, id="attached before lives were recorded"),
        pytest.param("", 0, {}, False, id="no lives recorded"),
    ],
)
def test_a_device_whose_server_may_have_lost_its_writes_is_disconnected(
    tmp_path: Path,
    lives: str,
    attached_life: int,
    record_changes: dict[str, object],
    lost: bool,
) -> None:
    (tmp_path / "lives").write_text(lives)
    record = dataclasses.replace(
        RECORD,
        nbd_socket=str(tmp_path / "nbd.sock"),
        server_life=attached_life,
        **record_changes,  # type: ignore[arg-type]
    )
    listener = ScriptedListener()
    attacher = ScriptedAttacher(listener)
    attacher.gate.set()
    registry = CollectorRegistry()
    metrics = Metrics("node-a", registry)
    events = RecordedEvents()
    monitor = LinkMonitor(
        attacher,  # type: ignore[arg-type]
        lambda: {record.volume_id: record},
        metrics,
        events=events,
    )
    monitor.start()
    try:
        listener.push(record.device_index, record.backend_id)
        wait_until(
            lambda: attacher.detached or attacher.reconfigured >= 2, 10.0, "the link handled"
        )
        time.sleep(0.1)
        reconnects = registry.get_sample_value(
            "zerofs_csi_nbd_reconnects_total", {"node": "node-a", "result": "writes_lost"}
        )
        if lost:
            assert attacher.detached == [(record.device_index, record.backend_id)]
            assert attacher.reconfigured == 0
            assert monitor.is_dead(record.volume_id)
            assert reconnects == 1
            [(volume_id, reason, message)] = events.warnings
            assert (volume_id, reason) == (record.volume_id, "WritesLost")
            assert "syncWrites" in message
            # Unstaged: a new stage's device starts with nothing reported.
            monitor.forget(record.volume_id)
            assert not monitor.is_dead(record.volume_id)
        else:
            assert attacher.detached == []
            assert not monitor.is_dead(record.volume_id)
            assert not reconnects
            assert events.warnings == []
    finally:
        monitor.stop()


def test_a_server_that_ended_during_the_handshake_is_caught_before_the_reconfigure(
    tmp_path: Path,
) -> None:
    """The server answered the handshake and was killed and restarted before the
    RECONFIGURE: the check made once the server answered sees it."""
    lives = tmp_path / "lives"
    lives.write_text("start 1\n")
    record = dataclasses.replace(RECORD, nbd_socket=str(tmp_path / "nbd.sock"), server_life=1)
    listener = ScriptedListener()
    attacher = ScriptedAttacher(listener)
    attacher.gate.set()

    def killed_and_restarted() -> None:
        with lives.open("a") as file:
            file.write("exit 2 137\nstart 3\n")
        attacher.during_handshake = lambda: None

    attacher.during_handshake = killed_and_restarted
    metrics = Metrics("node-a", CollectorRegistry())
    monitor = LinkMonitor(attacher, lambda: {record.volume_id: record}, metrics)  # type: ignore[arg-type]
    monitor.start()
    try:
        wait_until(lambda: attacher.detached, 10.0, "the device disconnected")
        assert attacher.reconfigured == 0
    finally:
        monitor.stop()
