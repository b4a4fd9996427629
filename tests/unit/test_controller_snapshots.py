"""The Controller's snapshot RPCs over a real gRPC socket, checkpointing through the real
ZeroFS stand-in: a short-lived server for a volume staged nowhere, the running server of
a staged one. Storage is file://, where the stand-in keeps a checkpoint as a copy of the
exports in ``<volume dir>/.checkpoints/<id>/.nbd/``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from standin.servers import STANDIN, NbdClient, start_volume_server, stop_process

from zerofs_csi.controller.checkpoints import LocalCheckpoints
from zerofs_csi.controller.nodes import LocalNodes
from zerofs_csi.controller.service import ControllerService
from zerofs_csi.controller.snapshot_store import FileSnapshotStore
from zerofs_csi.controller.store import FileVolumeStore
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.rpc.interceptor import CsiInterceptor
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.volume.secrets import VolumeSecrets

Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.ControllerServiceCapability.RPC
SECRETS = {"ZEROFS_ENCRYPTION_PASSWORD": "pw-snapshot-test"}
MiB = 1 << 20
SIZE = 16 * MiB


@dataclass
class Controller:
    stub: csi_pb2_grpc.ControllerStub
    state: Path
    store: Path  # the file:// storage: one directory per volume
    registry: CollectorRegistry
    # What the controller reported of its copies into new volumes: (volume id, percent).
    copy_reports: list[tuple[str, int | None]]

    def create_volume(self, name: str) -> str:
        reply = self.stub.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
                volume_capabilities=[
                    csi_pb2.VolumeCapability(
                        block=csi_pb2.VolumeCapability.BlockVolume(),
                        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
                    )
                ],
                parameters={"storageUrl": f"file://{self.store}"},
            ),
            timeout=30,
        )
        return reply.volume.volume_id

    def snapshot(
        self, name: str, volume_id: str, secrets: dict[str, str] | None = None
    ) -> csi_pb2.Snapshot:
        request = csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id, secrets=SECRETS if secrets is None else secrets
        )
        return self.stub.CreateSnapshot(request, timeout=120).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        request = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=SECRETS)
        self.stub.DeleteSnapshot(request, timeout=120)

    def listing(self, **fields: object) -> csi_pb2.ListSnapshotsResponse:
        return self.stub.ListSnapshots(csi_pb2.ListSnapshotsRequest(**fields), timeout=30)

    def checkpoints(self, volume_id: str) -> dict[str, str]:
        """The stand-in's checkpoints of the volume: name -> id."""
        root = self.store / volume_id / ".checkpoints"
        if not root.is_dir():
            return {}
        infos = [json.loads((d / "checkpoint.json").read_text()) for d in root.iterdir()]
        return {info["name"]: info["id"] for info in infos}


@pytest.fixture
def controller() -> Iterator[Controller]:
    # Short: the volume servers' unix socket paths live under the state directory.
    with tempfile.TemporaryDirectory(prefix="zs-") as directory:
        root = Path(directory)
        state, store = root / "state", root / "store"
        store.mkdir()
        registry = CollectorRegistry()
        metrics = Metrics("", registry)
        copy_reports: list[tuple[str, int | None]] = []

        def report_copy(volume_id: str, percent: int | None) -> None:
            copy_reports.append((volume_id, percent))
            metrics.report_copy(volume_id, percent)

        service = ControllerService(
            FileVolumeStore(state / "volumes"),
            metrics,
            nodes=LocalNodes(["node-a", "node-b"], max_volumes_per_node=0),
            snapshot_store=FileSnapshotStore(state / "snapshots"),
            checkpoints=LocalCheckpoints(
                state, state / "sockets", [str(STANDIN)], copy_progress=report_copy
            ),
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[CsiInterceptor(REDACTOR)]
        )
        csi_pb2_grpc.add_ControllerServicer_to_server(service, server)
        server.add_insecure_port(f"unix://{root}/csi.sock")
        server.start()
        with grpc.insecure_channel(f"unix://{root}/csi.sock") as channel:
            yield Controller(
                csi_pb2_grpc.ControllerStub(channel), state, store, registry, copy_reports
            )
        server.stop(grace=None).wait()


def fails(call: Callable[[], object], code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    for needle in needles:
        assert needle in info.value.details()
    return str(info.value.details())


def write_export(controller: Controller, volume_id: str, offset: int, data: bytes) -> None:
    """Data in the volume's export as a server would have left it (file:// layout)."""
    export = controller.store / volume_id / ".nbd" / volume_id
    export.parent.mkdir(parents=True, exist_ok=True)
    with export.open("r+b" if export.exists() else "w+b") as f:
        f.truncate(SIZE)
        f.seek(offset)
        f.write(data)


def read_checkpoint(controller: Controller, volume_id: str, name: str, length: int) -> bytes:
    checkpoint_id = controller.checkpoints(volume_id)[name]
    copy = controller.store / volume_id / ".checkpoints" / checkpoint_id / ".nbd" / volume_id
    return copy.read_bytes()[:length]


def standin_processes(controller: Controller) -> list[str]:
    """The stand-ins running with a config under this controller's state directory."""
    found = subprocess.run(
        ["pgrep", "-af", f"zerofs-standin run -c {controller.state}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.splitlines()


def test_snapshot_capabilities_are_offered(controller: Controller) -> None:
    reply = controller.stub.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
    )
    offered = {c.rpc.type for c in reply.capabilities}
    wanted = {RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME}
    assert wanted <= offered


def test_a_volume_staged_nowhere_is_checkpointed_by_a_short_lived_server(
    controller: Controller,
) -> None:
    vid = controller.create_volume("pvc-a")
    write_export(controller, vid, MiB, b"first" * 100)
    assert standin_processes(controller) == []

    made = controller.snapshot("snap-a", vid)
    assert made.snapshot_id == f"{vid}@snap-a"
    assert (made.source_volume_id, made.size_bytes, made.ready_to_use) == (vid, SIZE, True)
    assert made.creation_time.seconds > 0
    assert read_checkpoint(controller, vid, "snap-a", MiB + 500)[MiB:] == b"first" * 100
    # The short-lived server is gone, and its directory with it.
    assert standin_processes(controller) == []
    assert list((controller.state / "ck").iterdir()) == []

    # Same name and source: the same snapshot, no second checkpoint.
    write_export(controller, vid, MiB, b"later" * 100)
    again = controller.snapshot("snap-a", vid)
    assert again == made
    assert list(controller.checkpoints(vid)) == ["snap-a"]


def test_create_snapshot_refusals_leave_nothing(controller: Controller) -> None:
    vid = controller.create_volume("pvc-b")
    other = controller.create_volume("pvc-c")
    controller.snapshot("taken", vid)

    fails(lambda: controller.snapshot("", vid), grpc.StatusCode.INVALID_ARGUMENT, "name")
    fails(
        lambda: controller.snapshot("s", ""), grpc.StatusCode.INVALID_ARGUMENT, "source_volume_id"
    )
    fails(lambda: controller.snapshot("s", "pvc-none"), grpc.StatusCode.NOT_FOUND, "pvc-none")
    fails(lambda: controller.snapshot("taken", other), grpc.StatusCode.ALREADY_EXISTS, vid)
    fails(
        lambda: controller.snapshot("s", other, secrets={}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "snapshotter-secret",
    )
    with_parameters = csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=other, parameters={"speed": "fast"}, secrets=SECRETS
    )
    fails(
        lambda: controller.stub.CreateSnapshot(with_parameters, timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        "speed",
    )
    listed = controller.listing()
    assert [e.snapshot.snapshot_id for e in listed.entries] == [f"{vid}@taken"]
    assert controller.checkpoints(other) == {}


def test_delete_snapshot_removes_the_checkpoint_and_is_idempotent(controller: Controller) -> None:
    vid = controller.create_volume("pvc-d")
    made = controller.snapshot("snap-d", vid)
    assert list(controller.checkpoints(vid)) == ["snap-d"]

    fails(
        lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid)),
        grpc.StatusCode.FAILED_PRECONDITION,
        made.snapshot_id,
    )
    controller.delete_snapshot(made.snapshot_id)
    assert controller.checkpoints(vid) == {}
    assert controller.listing().entries == []
    controller.delete_snapshot(made.snapshot_id)
    controller.delete_snapshot("not-a-snapshot-id-of-this-driver")
    fails(
        lambda: controller.stub.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "snapshot_id",
    )
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=30)


def test_list_snapshots_filters_and_pages(controller: Controller) -> None:
    first, second = controller.create_volume("pvc-e"), controller.create_volume("pvc-f")
    ids = [controller.snapshot(f"s{n}", first).snapshot_id for n in range(3)]
    ids.append(controller.snapshot("s3", second).snapshot_id)

    assert [e.snapshot.snapshot_id for e in controller.listing().entries] == ids
    by_source = controller.listing(source_volume_id=second).entries
    assert [e.snapshot.snapshot_id for e in by_source] == [ids[3]]
    assert controller.listing(source_volume_id="pvc-none").entries == []
    assert [e.snapshot.snapshot_id for e in controller.listing(snapshot_id=ids[1]).entries] == [
        ids[1]
    ]
    assert controller.listing(snapshot_id=f"{first}@nothing").entries == []

    seen, token = [], ""
    while True:
        page = controller.listing(max_entries=2, starting_token=token)
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == ids
    fails(lambda: controller.listing(starting_token="bogus"), grpc.StatusCode.ABORTED, "bogus")
    fails(lambda: controller.listing(max_entries=-1), grpc.StatusCode.INVALID_ARGUMENT)


def start_staged_server(controller: Controller, volume_id: str) -> subprocess.Popen[bytes]:
    """The volume's server as the local backend runs a staged volume's: its sockets under
    ``<state>/sockets/<volume>/``, its admin service on ``rpc.sock``."""
    sockets = ServerSockets.under(controller.state / "sockets", volume_id)
    secrets = VolumeSecrets.from_csi_secrets(SECRETS)
    return start_volume_server(
        sockets, controller.store, volume_id, secrets, SIZE, controller.state
    )


def test_a_staged_volume_is_checkpointed_by_its_running_server(controller: Controller) -> None:
    vid = controller.create_volume("pvc-g")
    controller.stub.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid,
            node_id="node-a",
            volume_capability=csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
            ),
        ),
        timeout=30,
    )
    # Published, and its server not answering: no second server is started for it.
    fails(lambda: controller.snapshot("early", vid), grpc.StatusCode.UNAVAILABLE, "retry")
    assert controller.checkpoints(vid) == {}

    server = start_staged_server(controller, vid)
    try:
        sockets = ServerSockets.under(controller.state / "sockets", vid)
        with NbdClient(sockets.nbd, vid) as nbd:
            nbd.write(0, b"as-of-snapshot" * 64)
        # No secrets needed: the running server already has them.
        made = controller.snapshot("live", vid, secrets={})
        with NbdClient(sockets.nbd, vid) as nbd:
            nbd.write(0, b"after-snapshot" * 64)
        assert read_checkpoint(controller, vid, "live", 14 * 64) == b"as-of-snapshot" * 64
        controller.delete_snapshot(made.snapshot_id)
        assert controller.checkpoints(vid) == {}
    finally:
        stop_process(server)


def test_a_snapshot_waits_for_a_starting_servers_admin_service(controller: Controller) -> None:
    # The node backend records the server before starting it (servers/<volume>/server.json),
    # and the server answers NBD before its admin service: a snapshot taken right after a
    # stage waits for the admin service rather than failing UNAVAILABLE at once.
    vid = controller.create_volume("pvc-starting")
    record = controller.state / "servers" / vid / "server.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    request = csi_pb2.CreateSnapshotRequest(name="right-after-stage", source_volume_id=vid)
    pending = controller.stub.CreateSnapshot.future(request, timeout=120)
    time.sleep(1.0)
    assert not pending.done()
    server = start_staged_server(controller, vid)
    try:
        assert pending.result().snapshot.ready_to_use
        assert "right-after-stage" in controller.checkpoints(vid)
    finally:
        stop_process(server)


def block(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


def create_from_snapshot(
    controller: Controller,
    name: str,
    snapshot_id: str,
    required: int,
    limit: int = 0,
    modes: tuple[int, ...] = (Mode.SINGLE_NODE_WRITER,),
) -> csi_pb2.Volume:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=[block(mode) for mode in modes],
        parameters={"storageUrl": f"file://{controller.store}"},
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
        ),
        secrets=SECRETS,
    )
    return controller.stub.CreateVolume(request, timeout=120).volume


def test_a_volume_created_from_a_snapshot_holds_its_data(controller: Controller) -> None:
    vid = controller.create_volume("pvc-h")
    write_export(controller, vid, 3 * MiB, b"restore-me" * 50)
    write_export(controller, vid, SIZE - 4096, b"tail" * 1024)
    made = controller.snapshot("snap-h", vid)
    write_export(controller, vid, 3 * MiB, b"overwrite!" * 50)

    restored = create_from_snapshot(controller, "pvc-h-restored", made.snapshot_id, 2 * SIZE)
    assert restored.capacity_bytes == 2 * SIZE
    assert restored.content_source.snapshot.snapshot_id == made.snapshot_id
    export = controller.store / restored.volume_id / ".nbd" / restored.volume_id
    data = export.read_bytes()
    assert len(data) == 2 * SIZE
    assert data[3 * MiB : 3 * MiB + 500] == b"restore-me" * 50
    assert data[SIZE - 4096 : SIZE] == b"tail" * 1024
    assert data[SIZE:] == bytes(SIZE)
    # Only what the snapshot holds was written: the rest of the export is holes.
    assert export.stat().st_blocks * 512 < 2 * MiB
    assert list((controller.state / "ck").iterdir()) == []
    # The copy's progress went up to 100 % and its series went once it ended.
    percents = [p for v, p in controller.copy_reports if v == restored.volume_id]
    assert percents[-2:] == [100, None] and percents[:-1] == sorted(percents[:-1]), percents
    assert (
        controller.registry.get_sample_value(
            "zerofs_csi_volume_copy_progress_percent",
            {"volume_id": restored.volume_id, "node": ""},
        )
        is None
    )

    again = create_from_snapshot(controller, "pvc-h-restored", made.snapshot_id, 2 * SIZE)
    assert again == restored
    other = controller.snapshot("snap-h2", vid)
    fails(
        lambda: create_from_snapshot(controller, "pvc-h-restored", other.snapshot_id, 2 * SIZE),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    # The snapshot's source volume can go once its snapshots are gone; the copy stays.
    for snapshot_id in (made.snapshot_id, other.snapshot_id):
        controller.delete_snapshot(snapshot_id)
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=30)
    assert export.read_bytes()[3 * MiB : 3 * MiB + 500] == b"restore-me" * 50


def test_create_from_a_snapshot_refusals_leave_nothing(controller: Controller) -> None:
    vid = controller.create_volume("pvc-i")
    made = controller.snapshot("snap-i", vid)
    fails(
        lambda: create_from_snapshot(controller, "pvc-j", f"{vid}@missing", SIZE),
        grpc.StatusCode.NOT_FOUND,
        "missing",
    )
    fails(
        lambda: create_from_snapshot(controller, "pvc-j", made.snapshot_id, MiB, limit=MiB),
        grpc.StatusCode.OUT_OF_RANGE,
        "limit_bytes",
    )
    listed = controller.stub.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
    assert [e.volume.volume_id for e in listed.entries] == [vid]
    assert not (controller.store / "pvc-j").exists()


def test_a_clone_holds_the_source_volumes_data_and_leaves_no_checkpoint(
    controller: Controller,
) -> None:
    vid = controller.create_volume("pvc-k")
    write_export(controller, vid, 5 * MiB, b"clone-me" * 64)
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-k-clone",
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[
            csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
            )
        ],
        parameters={"storageUrl": f"file://{controller.store}"},
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)
        ),
        secrets=SECRETS,
    )
    clone = controller.stub.CreateVolume(request, timeout=120).volume
    assert clone.content_source.volume.volume_id == vid
    export = controller.store / clone.volume_id / ".nbd" / clone.volume_id
    assert export.read_bytes()[5 * MiB : 5 * MiB + 512] == b"clone-me" * 64
    assert controller.checkpoints(vid) == {}
    assert controller.stub.CreateVolume(request, timeout=120).volume == clone

    request.name = "pvc-l"
    request.volume_content_source.volume.volume_id = "pvc-none"
    fails(lambda: controller.stub.CreateVolume(request, timeout=60), grpc.StatusCode.NOT_FOUND)


def test_get_snapshot(controller: Controller) -> None:
    vid = controller.create_volume("pvc-m")
    made = controller.snapshot("snap-m", vid)
    got = controller.stub.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=made.snapshot_id), timeout=30
    ).snapshot
    assert got == made
    missing = csi_pb2.GetSnapshotRequest(snapshot_id=f"{vid}@other")
    fails(lambda: controller.stub.GetSnapshot(missing, timeout=30), grpc.StatusCode.NOT_FOUND)
    fails(
        lambda: controller.stub.GetSnapshot(csi_pb2.GetSnapshotRequest(), timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_a_read_only_many_volume_is_published_to_many_nodes_and_never_written(
    controller: Controller,
) -> None:
    vid = controller.create_volume("pvc-rox-source")
    write_export(controller, vid, MiB, b"for-every-reader" * 64)
    made = controller.snapshot("snap-rox", vid)
    readers = (Mode.MULTI_NODE_READER_ONLY,)
    fails(
        lambda: create_from_snapshot(
            controller, "pvc-rox", made.snapshot_id, SIZE, modes=(*readers, Mode.SINGLE_NODE_WRITER)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a writer access mode does not fit it",
    )
    empty = csi_pb2.CreateVolumeRequest(
        name="pvc-rox-empty",
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[block(Mode.MULTI_NODE_READER_ONLY)],
        parameters={"storageUrl": f"file://{controller.store}"},
    )
    fails(
        lambda: controller.stub.CreateVolume(empty, timeout=30),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must come from a snapshot or a volume",
    )
    rox = create_from_snapshot(controller, "pvc-rox", made.snapshot_id, SIZE, modes=readers)
    export = controller.store / rox.volume_id / ".nbd" / rox.volume_id
    assert export.read_bytes()[MiB : MiB + 1024] == b"for-every-reader" * 64
    fails(
        lambda: create_from_snapshot(controller, "pvc-rox", made.snapshot_id, SIZE),
        grpc.StatusCode.ALREADY_EXISTS,
        "MULTI_NODE_READER_ONLY",
    )

    def publish(volume_id: str, node: str, mode: int) -> None:
        controller.stub.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node, volume_capability=block(mode)
            ),
            timeout=30,
        )

    def published(volume_id: str) -> list[str]:
        reply = controller.stub.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id), timeout=30
        )
        return sorted(reply.status.published_node_ids)

    for node in ("node-a", "node-b", "node-a"):
        publish(rox.volume_id, node, Mode.MULTI_NODE_READER_ONLY)
    assert published(rox.volume_id) == ["node-a", "node-b"]
    # Refusals: a writer of a ReadOnlyMany volume, many readers of a writer's volume.
    fails(
        lambda: publish(rox.volume_id, "node-b", Mode.SINGLE_NODE_WRITER),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not fit",
    )
    fails(
        lambda: publish(vid, "node-a", Mode.MULTI_NODE_READER_ONLY),
        grpc.StatusCode.INVALID_ARGUMENT,
        "created for one writer",
    )
    validated = controller.stub.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=rox.volume_id, volume_capabilities=[block()]
        ),
        timeout=30,
    )
    assert not validated.HasField("confirmed") and "does not fit" in validated.message
    # Its servers are read-only: no checkpoint of it, no clone through one.
    fails(
        lambda: controller.snapshot("snap-of-rox", rox.volume_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MULTI_NODE_READER_ONLY",
    )
    delete = csi_pb2.DeleteVolumeRequest(volume_id=rox.volume_id)
    fails(
        lambda: controller.stub.DeleteVolume(delete, timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        "node-a, node-b",
    )
    unpublish = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=rox.volume_id, node_id="node-a")
    controller.stub.ControllerUnpublishVolume(unpublish, timeout=30)
    controller.stub.ControllerUnpublishVolume(unpublish, timeout=30)
    assert published(rox.volume_id) == ["node-b"]
    unpublish.node_id = ""  # from every node
    controller.stub.ControllerUnpublishVolume(unpublish, timeout=30)
    assert published(rox.volume_id) == []
    controller.stub.DeleteVolume(delete, timeout=30)
