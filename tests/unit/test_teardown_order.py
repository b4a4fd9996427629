"""Teardown's order: nothing is unmounted, disconnected or stopped while the volume's NBD
link is dead (unless its server may have lost its writes: then the device is disconnected
first), and nothing is disconnected or stopped while the device has requests in
flight. The device and the server are stood in for (the host kernel has no NBD); the
privileged tests tear down real ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from zerofs_csi.errors import Unavailable
from zerofs_csi.node import staging
from zerofs_csi.node.stage_record import RecordStore, StageRecord
from zerofs_csi.observability.metrics import Metrics


@dataclass
class Device:
    index: int = 7
    path: str = "/dev/nbd7"
    size_bytes: int = 1 << 20


@dataclass
class Node:
    """The attacher and the server backend, recording what teardown did in order."""

    calls: list[str] = field(default_factory=list)
    name: str = "local"

    def find_device(self, backend_id: str) -> Device | None:
        return None if "detach" in self.calls else Device()

    def detach(self, index: int, backend_id: str) -> None:
        self.calls.append("detach")

    def stop(self, volume_id: str) -> None:
        self.calls.append("stop server")


def stager_and_record(tmp_path: Path) -> tuple[staging.Stager, Node, StageRecord]:
    node = Node()
    records = RecordStore(tmp_path / "state")
    stager = staging.Stager(
        node,  # type: ignore[arg-type]
        node,  # type: ignore[arg-type]
        lambda *_: None,  # type: ignore[arg-type,return-value]
        records,
        Metrics("node-a", CollectorRegistry()),
    )
    record = StageRecord(
        volume_id="pvc-1",
        backend_id="zerofs-csi:pvc-1",
        device_index=7,
        size_bytes=1 << 20,
        access_type=staging.BLOCK,
        fs_type="",
        server_backend="local",
        nbd_socket="/run/nbd.sock",
        staging_path=str(tmp_path / "staging"),
    )
    (tmp_path / "staging").mkdir(parents=True)
    records.write(record)
    return stager, node, record


def test_a_dead_link_is_waited_for_and_nothing_is_torn_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stager, node, record = stager_and_record(tmp_path)
    monkeypatch.setattr(staging, "LINK_WAIT_S", 0.2)
    stager.watch_links(lambda volume_id: volume_id == "pvc-1", lambda volume_id: None)
    with pytest.raises(Unavailable, match="link .* is dead"):
        stager.teardown(record, operation="unstage")
    assert node.calls == []


def test_requests_in_flight_keep_the_device_and_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stager, node, record = stager_and_record(tmp_path)
    in_flight = [3, 1, 0]
    monkeypatch.setattr(staging, "_in_flight", lambda index: in_flight.pop(0) if in_flight else 0)
    stager.teardown(record, operation="unstage")
    assert in_flight == [] and node.calls == ["detach", "stop server"]

    stager, node, record = stager_and_record(tmp_path / "again")
    monkeypatch.setattr(staging, "DRAIN_WAIT_S", 0.2)
    monkeypatch.setattr(staging, "_in_flight", lambda index: 1)
    with pytest.raises(Unavailable, match="in flight"):
        stager.teardown(record, operation="unstage")
    assert node.calls == []


def test_a_device_whose_server_lost_writes_is_disconnected_first_and_forgotten_after(
    tmp_path: Path,
) -> None:
    """Its link stays dead: waiting for it would end in UNAVAILABLE, and the unmount's
    writes must fail rather than wait. Once unstaged, the link monitor forgets it."""
    stager, node, record = stager_and_record(tmp_path)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    (sockets / "lives").write_text("start 1\nexit 2 137\nstart 3\n")
    record = dataclasses.replace(record, nbd_socket=str(sockets / "nbd.sock"), server_life=1)
    forgotten: list[str] = []
    stager.watch_links(lambda volume_id: True, forgotten.append)
    stager.teardown(record, operation="unstage")
    assert node.calls == ["detach", "stop server"]
    assert forgotten == ["pvc-1"]
