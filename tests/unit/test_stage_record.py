"""The stage record and its index on a real filesystem."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zerofs_csi.node.stage_record import (
    ATTACHED,
    RECORD_NAME,
    STAGED,
    Publication,
    RecordStore,
    StageRecord,
    backend_id_for,
    volume_of_backend,
)


def record_at(staging: Path, phase: str = STAGED) -> StageRecord:
    staging.mkdir(parents=True, exist_ok=True)
    return StageRecord(
        volume_id="pvc-1",
        backend_id=backend_id_for("pvc-1"),
        device_index=3,
        size_bytes=1 << 30,
        access_type="mount",
        fs_type="ext4",
        server_backend="process",
        nbd_socket="/run/zerofs/pvc-1/nbd.sock",
        staging_path=str(staging),
        mount_options=("noatime",),
        phase=phase,
    )


def test_round_trip_through_the_index(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    record = record_at(tmp_path / "staging")

    store.write(record)

    assert store.staging_path_of("pvc-1") == record.staging_path
    assert store.read(record.staging_path) == record
    assert store.indexed_volumes() == ["pvc-1"]
    store.remove("pvc-1", record.staging_path)
    assert store.read(record.staging_path) is None
    assert store.staging_path_of("pvc-1") is None


def test_a_later_phase_keeps_the_index_and_replaces_the_record(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    attached = record_at(tmp_path / "staging", ATTACHED)
    store.write(attached)
    index = tmp_path / "state" / "staged" / "pvc-1.json"
    written = index.stat().st_ino

    store.write(dataclasses.replace(attached, phase=STAGED))

    assert index.stat().st_ino == written  # not written again
    stored = store.read(attached.staging_path)
    assert stored is not None and stored.phase == STAGED


@pytest.mark.parametrize(
    "index_text",
    [
        None,  # no index yet
        '{"staging_path": "/elsewhere", "version": 1}',  # another staging path
        "{not json",
        '{"version": 1}',
        "[]",
    ],
)
def test_the_index_is_written_when_it_does_not_name_the_staging_path(
    tmp_path: Path, index_text: str | None
) -> None:
    store = RecordStore(tmp_path / "state")
    index = tmp_path / "state" / "staged" / "pvc-1.json"
    if index_text is not None:
        index.parent.mkdir(parents=True)
        index.write_text(index_text)
    record = record_at(tmp_path / "staging")

    store.write(record)

    assert store.staging_path_of("pvc-1") == record.staging_path


def test_a_record_of_another_version_is_refused(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    record = record_at(tmp_path / "staging")
    store.write(record)
    path = Path(record.staging_path) / RECORD_NAME
    path.write_text(path.read_text().replace('"version": 1', '"version": 99'))

    with pytest.raises(ValueError, match="version 99"):
        store.read(record.staging_path)


def test_publications_round_trip_and_records_from_before_them_read_as_none(
    tmp_path: Path,
) -> None:
    store = RecordStore(tmp_path / "state")
    published = dataclasses.replace(
        record_at(tmp_path / "staging"),
        publications=(
            Publication("/pods/a/volume", "SINGLE_NODE_SINGLE_WRITER", False),
            Publication("/pods/b/volume", "SINGLE_NODE_READER_ONLY", True),
        ),
    )
    store.write(published)
    assert store.read(published.staging_path) == published

    path = Path(published.staging_path) / RECORD_NAME
    data = json.loads(path.read_text())
    del data["publications"]
    path.write_text(json.dumps(data))
    old = store.read(published.staging_path)
    assert old is not None and old.publications == ()


def test_a_record_reached_through_a_symlink_is_not_the_path_s(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    record = record_at(tmp_path / "staging")
    store.write(record)
    (tmp_path / "link").symlink_to(tmp_path / "staging")

    assert store.read(str(tmp_path / "link")) is None
    assert store.read(record.staging_path) == record


def test_formatting_marker(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "state")
    assert not store.formatting_interrupted("pvc-1")
    store.mark_formatting("pvc-1")
    assert store.formatting_interrupted("pvc-1")
    store.clear_formatting("pvc-1")
    assert not store.formatting_interrupted("pvc-1")


@pytest.mark.parametrize(
    ("backend", "volume"),
    [
        (backend_id_for("pvc-1"), "pvc-1"),
        ("zerofs-csi:", None),
        ("other-driver:pvc-1", None),
        ("", None),
    ],
)
def test_volume_of_backend(backend: str, volume: str | None) -> None:
    assert volume_of_backend(backend) == volume
