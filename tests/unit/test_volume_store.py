"""The volume metadata store: one behaviour contract, run against every implementation.

``StoreContract`` holds the test bodies; ``TestFileVolumeStore`` runs them on a directory,
and tests/kube/test_volume_store_kube.py runs them on ConfigMaps in an API server.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from zerofs_csi import errors
from zerofs_csi.controller.store import FileVolumeStore, VolumeRecord, VolumeStore


def make_record(volume_id: str = "pvc-1", **changes: object) -> VolumeRecord:
    record = VolumeRecord(
        volume_id=volume_id,
        capacity_bytes=1 << 30,
        parameters={"storageUrl": "s3://bucket/volumes"},
        request_parameters={"storageUrl": "s3://bucket/volumes"},
        volume_context={"storageUrl": "s3://bucket/volumes", "capacityBytes": str(1 << 30)},
        created_at="2026-01-01T00:00:00Z",
    )
    return record.replace(**changes)


def content(record: VolumeRecord | None) -> VolumeRecord | None:
    """The record without its version token, to compare what was stored."""
    return None if record is None else record.replace(version="")


class StoreContract:
    """Behaviour every VolumeStore must have. Subclasses provide the two fixtures:
    ``store`` (an empty store) and ``reopen`` (a new instance on the same backing, as a
    restarted controller would build it)."""

    def test_create_then_get(self, store: VolumeStore) -> None:
        created = store.create(make_record())
        assert created.version
        assert content(created) == make_record()
        fetched = store.get("pvc-1")
        assert fetched == created
        assert store.get("pvc-2") is None

    def test_create_of_an_existing_volume_is_aborted(self, store: VolumeStore) -> None:
        store.create(make_record())
        with pytest.raises(errors.Aborted, match="pvc-1"):
            store.create(make_record(capacity_bytes=4096))
        assert content(store.get("pvc-1")) == make_record()

    def test_update_needs_the_current_version(self, store: VolumeStore) -> None:
        first = store.create(make_record())
        second = store.update(first.replace(published_node="node-a"))
        assert second.version and second.version != first.version
        assert store.get("pvc-1") == second
        # A writer still holding the first read loses: its change is not applied.
        with pytest.raises(errors.Aborted, match="changed concurrently"):
            store.update(first.replace(capacity_bytes=2 << 30))
        assert content(store.get("pvc-1")) == make_record(published_node="node-a")

    def test_update_of_a_deleted_volume_is_aborted(self, store: VolumeStore) -> None:
        record = store.create(make_record())
        store.delete(record)
        with pytest.raises(errors.Aborted):
            store.update(record.replace(published_node="node-a"))
        assert store.get("pvc-1") is None

    def test_delete_needs_the_current_version_and_is_idempotent(self, store: VolumeStore) -> None:
        first = store.create(make_record())
        second = store.update(first.replace(capacity_bytes=2 << 30))
        with pytest.raises(errors.Aborted):
            store.delete(first)
        assert store.get("pvc-1") == second
        store.delete(second)
        assert store.get("pvc-1") is None
        store.delete(second)  # already gone: fine

    def test_a_version_from_before_a_recreate_does_not_match(self, store: VolumeStore) -> None:
        old = store.create(make_record())
        store.delete(old)
        new = store.create(make_record(capacity_bytes=8192))
        assert new.version != old.version
        with pytest.raises(errors.Aborted):
            store.update(old.replace(published_node="node-a"))
        assert store.get("pvc-1") == new

    def test_list_is_sorted_and_complete(self, store: VolumeStore) -> None:
        assert store.list() == []
        for vid in ("pvc-3", "pvc-1", "pvc-10", "pvc-2"):
            store.create(make_record(vid))
        listed = store.list()
        assert [r.volume_id for r in listed] == ["pvc-1", "pvc-10", "pvc-2", "pvc-3"]
        assert all(r.version for r in listed)
        assert listed[0] == store.get("pvc-1")

    def test_records_survive_a_restart(
        self, store: VolumeStore, reopen: Callable[[], VolumeStore]
    ) -> None:
        record = store.create(make_record())
        published = store.update(record.replace(published_node="node-a"))
        store.create(make_record("pvc-2"))
        again = reopen()
        assert again.get("pvc-1") == published
        assert [r.volume_id for r in again.list()] == ["pvc-1", "pvc-2"]
        # The restarted instance keeps the compare-and-swap semantics of the old one.
        with pytest.raises(errors.Aborted):
            again.update(record.replace(published_node="node-b"))
        again.update(published.replace(published_node=None))
        assert content(store.get("pvc-1")) == make_record()

    def test_round_trip_of_every_field(self, store: VolumeStore) -> None:
        record = make_record(
            "a-1",
            capacity_bytes=(2**63 - 1) // 4096 * 4096,
            parameters={"storageUrl": "s3://b/p", "rustLog": "zerofs=debug,slatedb=info"},
            request_parameters={"storageUrl": "s3://b/p", "x": 'ünïcode "quoted" \n'},
            volume_context={"capacityBytes": "4096", "empty": ""},
            published_node="node.with.dots-1",
            name="A-1 \u00fcn\u00efcode \u6570\u636e \t",
            created_at="2026-01-02T03:04:05Z",
        )
        stored = store.create(record)
        assert content(store.get("a-1")) == record
        assert content(stored) == record
        readers = make_record(
            "a-2",
            source_snapshot_id="a-1@snap",
            read_only_many=True,
            reader_nodes=("node-a", "node.b"),
        )
        store.create(readers)
        assert content(store.get("a-2")) == readers
        assert store.get("a-2").published_nodes == ["node-a", "node.b"]  # type: ignore[union-attr]

    @pytest.mark.parametrize("volume_id", ["", "../x", "PVC-1", "a/b", "x" * 64])
    def test_unsafe_volume_ids_are_refused(self, store: VolumeStore, volume_id: str) -> None:
        with pytest.raises(errors.InvalidArgument):
            store.get(volume_id)
        with pytest.raises(errors.InvalidArgument):
            store.create(make_record().replace(volume_id=volume_id))

    def test_concurrent_updates_from_one_read_let_exactly_one_win(self, store: VolumeStore) -> None:
        record = store.create(make_record())
        outcomes: list[str] = []
        barrier = threading.Barrier(6)

        def publish(node: str) -> None:
            barrier.wait()
            try:
                store.update(record.replace(published_node=node))
                outcomes.append(node)
            except errors.Aborted:
                outcomes.append("aborted")

        threads = [threading.Thread(target=publish, args=(f"node-{i}",)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        winners = [o for o in outcomes if o != "aborted"]
        assert len(outcomes) == 6 and len(winners) == 1
        current = store.get("pvc-1")
        assert current is not None and current.published_node == winners[0]


class TestFileVolumeStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> VolumeStore:
        return FileVolumeStore(tmp_path / "volumes")

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], VolumeStore]:
        return lambda: FileVolumeStore(tmp_path / "volumes")

    def test_writes_leave_only_record_files(self, tmp_path: Path) -> None:
        store = FileVolumeStore(tmp_path / "volumes")
        record = store.create(make_record())
        store.update(record.replace(published_node="node-a"))
        store.create(make_record("pvc-2"))
        names = sorted(p.name for p in (tmp_path / "volumes").iterdir())
        assert names == [".lock", "pvc-1.json", "pvc-2.json"]
        body = json.loads((tmp_path / "volumes" / "pvc-1.json").read_text())
        assert body["record"]["publishedNode"] == "node-a"
        assert body["record"]["schema"] == 1

    def test_a_record_written_before_names_were_kept_is_named_by_its_id(
        self, tmp_path: Path
    ) -> None:
        store = FileVolumeStore(tmp_path / "volumes")
        store.create(make_record(name="pvc-1"))
        path = tmp_path / "volumes" / "pvc-1.json"
        body = json.loads(path.read_text())
        del body["record"]["name"]
        path.write_text(json.dumps(body))
        record = store.get("pvc-1")
        assert record is not None and record.name == "pvc-1"

    def test_a_damaged_record_is_an_internal_error_naming_the_file(self, tmp_path: Path) -> None:
        store = FileVolumeStore(tmp_path / "volumes")
        store.create(make_record())
        path = tmp_path / "volumes" / "pvc-1.json"
        path.write_text(path.read_text()[:40])
        with pytest.raises(errors.Internal, match="pvc-1.json"):
            store.get("pvc-1")
        with pytest.raises(errors.Internal, match="pvc-1.json"):
            store.list()

    def test_a_record_from_another_schema_is_refused(self, tmp_path: Path) -> None:
        store = FileVolumeStore(tmp_path / "volumes")
        store.create(make_record())
        path = tmp_path / "volumes" / "pvc-1.json"
        body = json.loads(path.read_text())
        body["record"]["schema"] = 99
        path.write_text(json.dumps(body))
        with pytest.raises(errors.Internal, match="schema 99"):
            store.get("pvc-1")

    def test_a_record_under_the_wrong_name_is_refused(self, tmp_path: Path) -> None:
        store = FileVolumeStore(tmp_path / "volumes")
        store.create(make_record())
        os.rename(tmp_path / "volumes" / "pvc-1.json", tmp_path / "volumes" / "pvc-9.json")
        with pytest.raises(errors.Internal, match="holds volume 'pvc-1'"):
            store.get("pvc-9")

    def test_a_directory_that_cannot_be_made_is_an_internal_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(errors.Internal, match="metadata directory"):
            FileVolumeStore(tmp_path / "file" / "volumes")

    def test_two_processes_sharing_the_directory_serialise_writes(self, tmp_path: Path) -> None:
        """Two store instances (as two controller processes) racing on one volume."""
        first, second = FileVolumeStore(tmp_path / "v"), FileVolumeStore(tmp_path / "v")
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def create(store: VolumeStore, node: str) -> None:
            barrier.wait()
            try:
                store.create(make_record(published_node=node))
                outcomes.append(node)
            except errors.Aborted:
                outcomes.append("aborted")

        threads = [
            threading.Thread(target=create, args=(first, "node-a")),
            threading.Thread(target=create, args=(second, "node-b")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(outcomes) == 2 and outcomes.count("aborted") == 1
        winner = next(o for o in outcomes if o != "aborted")
        current = first.get("pvc-1")
        assert current is not None and current.published_node == winner
