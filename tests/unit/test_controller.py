"""The Controller service over a real gRPC unix socket, with the volume store on disk."""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from zerofs_csi import errors
from zerofs_csi.controller.arguments import DEFAULT_CAPACITY_BYTES
from zerofs_csi.controller.nodes import LocalNodes, NodeDirectory
from zerofs_csi.controller.service import ControllerService, DataDeleter
from zerofs_csi.controller.store import FileVolumeStore
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.rpc.interceptor import CsiInterceptor
from zerofs_csi.volume.context import build_volume_context, parse_volume_context
from zerofs_csi.volume.id import validate_volume_id, volume_id_for_name
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings, parse_volume_settings

Mode = csi_pb2.VolumeCapability.AccessMode
GiB = 1 << 30
STORAGE = {"storageUrl": "s3://bucket/volumes"}
PASSWORD = "pw-controller-test-never-logged"
SECRETS = {
    "ZEROFS_ENCRYPTION_PASSWORD": PASSWORD,
    "AWS_ACCESS_KEY_ID": "AKIACONTROLLERTEST01",
    "AWS_SECRET_ACCESS_KEY": "sk-controller-test-secret",
}


# The nodes the tests publish to; any other node does not exist.
NODES = LocalNodes(["node-a", "node-b"], max_volumes_per_node=0)


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


def create_request(name: str = "pvc-1", **fields: Any) -> csi_pb2.CreateVolumeRequest:
    fields.setdefault("volume_capabilities", [mount_cap()])
    fields.setdefault("parameters", dict(STORAGE))
    return csi_pb2.CreateVolumeRequest(name=name, **fields)


def size(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


@dataclass
class Recorder:
    """Stands in for the Kubernetes server remover and records what it was asked."""

    removed: list[str] = field(default_factory=list)
    failure: errors.CsiError | None = None

    def __call__(self, volume_id: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.removed.append(volume_id)


@dataclass
class Controller:
    stub: csi_pb2_grpc.ControllerStub
    store_dir: Path
    registry: CollectorRegistry
    remover: Recorder
    server: grpc.Server
    channel: grpc.Channel

    @property
    def store(self) -> FileVolumeStore:
        return FileVolumeStore(self.store_dir)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=None).wait()

    def objects_deleted(self) -> float:
        value = self.registry.get_sample_value("zerofs_csi_s3_objects_deleted_total", {"node": ""})
        return value or 0.0


def serve(
    socket_dir: Path,
    store_dir: Path,
    *,
    read_config_map: Callable[[str], Mapping[str, str]] | None = None,
    delete_data: DataDeleter | None = None,
    remover: Recorder | None = None,
    nodes: NodeDirectory = NODES,
    name: str = "controller",
) -> Controller:
    registry = CollectorRegistry()
    metrics = Metrics("", registry)
    remover = remover or Recorder()
    options: dict[str, Any] = {"remove_servers": remover, "nodes": nodes}
    if read_config_map is not None:
        options["read_config_map"] = read_config_map
    if delete_data is not None:
        options["delete_data"] = delete_data
    service = ControllerService(FileVolumeStore(store_dir), metrics, **options)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[CsiInterceptor(REDACTOR, observers=[metrics.observe_call])],
    )
    csi_pb2_grpc.add_ControllerServicer_to_server(service, server)
    target = f"unix://{socket_dir}/{name}.sock"
    server.add_insecure_port(target)
    server.start()
    channel = grpc.insecure_channel(target)
    return Controller(
        csi_pb2_grpc.ControllerStub(channel), store_dir, registry, remover, server, channel
    )


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="zc-") as directory:
        yield Path(directory)


@pytest.fixture
def make_controller(socket_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    started: list[Controller] = []

    def make(**options: Any) -> Controller:
        options.setdefault("name", f"controller-{len(started)}")
        controller = serve(socket_dir, tmp_path / "volumes", **options)
        started.append(controller)
        return controller

    yield make
    for controller in started:
        controller.stop()


@pytest.fixture
def controller(make_controller: Callable[..., Controller]) -> Controller:
    return make_controller()


def fails(call: Callable[[], object], code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    for needle in needles:
        assert needle in info.value.details()
    return str(info.value.details())


# ---------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("request_", "code", "needles"),
    [
        (create_request(""), grpc.StatusCode.INVALID_ARGUMENT, ["name is required"]),
        (create_request("pvc\x00"), grpc.StatusCode.INVALID_ARGUMENT, ["U+0000", "CSI spec"]),
        (create_request("p" * 129), grpc.StatusCode.INVALID_ARGUMENT, ["129 bytes", "128"]),
        (
            create_request(volume_capabilities=[]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["volume_capabilities is required"],
        ),
        (
            create_request(
                volume_capabilities=[mount_cap(), mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["volume_capabilities[1]", "MULTI_NODE_MULTI_WRITER"],
        ),
        (
            create_request(volume_capabilities=[mount_cap(fs_type="zfs")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'zfs' is not supported"],
        ),
        (
            create_request(
                volume_capabilities=[csi_pb2.VolumeCapability(access_mode=Mode(mode=1))]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["access type"],
        ),
        (
            create_request(capacity_range=size(2 * GiB, GiB)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["greater than limit_bytes"],
        ),
        (
            create_request(capacity_range=size(4097, 5000)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["round up to 8192"],
        ),
        (
            create_request(capacity_range=size(0, 4095)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["smaller than one 4096-byte block"],
        ),
        (
            create_request(capacity_range=size(-1, 0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["must not be negative"],
        ),
        (
            create_request(capacity_range=size(2**63 - 1)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["too large"],
        ),
        (
            create_request(
                volume_content_source=csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["volume_content_source"],
        ),
        (
            create_request(mutable_parameters={"iops": "10"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["mutable_parameters"],
        ),
        (
            create_request(parameters={**STORAGE, "fsType": "ext4"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["unknown StorageClass parameter 'fsType'", "filesystem", "storageUrl"],
        ),
        (
            create_request(parameters={}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'storageUrl' is required"],
        ),
        (
            create_request(parameters={**STORAGE, "filesystem": "ntfs"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'filesystem'"],
        ),
        (
            create_request(parameters={"configMapName": "zerofs-settings"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["configMapName", "needs the Kubernetes API"],
        ),
        (
            create_request(parameters={**STORAGE, "deleteDataOnPVCDelete": "true"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["deleteDataOnPVCDelete needs the provisioner secret", "ZEROFS_ENCRYPTION_PASSWORD"],
        ),
    ],
    ids=lambda value: None,
)
def test_create_volume_validation(
    controller: Controller,
    request_: csi_pb2.CreateVolumeRequest,
    code: grpc.StatusCode,
    needles: list[str],
) -> None:
    fails(lambda: controller.stub.CreateVolume(request_), code, *needles)
    assert controller.store.list() == []


@pytest.mark.parametrize(
    ("capacity_range", "expected"),
    [
        (None, DEFAULT_CAPACITY_BYTES),
        (size(0, 0), DEFAULT_CAPACITY_BYTES),
        (size(1), 4096),
        (size(4096), 4096),
        (size(4097), 8192),
        (size(0, 10_000), 8192),
        (size(0, 10 * GiB), DEFAULT_CAPACITY_BYTES),
        (size(GiB + 1, 2 * GiB), GiB + 4096),
        (size(3 * GiB, 3 * GiB), 3 * GiB),
    ],
)
def test_create_volume_capacity(
    controller: Controller, capacity_range: csi_pb2.CapacityRange | None, expected: int
) -> None:
    # A block volume has no filesystem minimum (filesystems.MIN_SIZE_BYTES): rounding
    # alone decides its size.
    request = create_request(volume_capabilities=[block_cap()])
    if capacity_range is not None:
        request.capacity_range.CopyFrom(capacity_range)
    volume = controller.stub.CreateVolume(request).volume
    assert volume.capacity_bytes == expected
    assert volume.volume_context["capacityBytes"] == str(expected)


def test_create_volume_returns_the_context_the_node_needs(controller: Controller) -> None:
    parameters = {
        **STORAGE,
        "filesystem": "xfs",
        "s3Endpoint": "https://s3.example.net",
        "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "default",
    }
    request = create_request(
        volume_capabilities=[block_cap(), mount_cap(Mode.SINGLE_NODE_MULTI_WRITER)],
        parameters=parameters,
        capacity_range=size(2 * GiB),
        accessibility_requirements=csi_pb2.TopologyRequirement(),
    )
    volume = controller.stub.CreateVolume(request).volume
    assert volume.volume_id == "pvc-1"
    settings = parse_volume_settings({k: v for k, v in parameters.items() if "/" not in k})
    context = dict(volume.volume_context)
    assert context == build_volume_context(settings, 2 * GiB, parameters)
    # The claim is named so that the node can post Events on it.
    assert context["csi.storage.k8s.io/pvc/name"] == "data"
    assert context["csi.storage.k8s.io/pvc/namespace"] == "default"
    assert parse_volume_context(volume.volume_context) == (settings, 2 * GiB)
    assert not volume.accessible_topology
    assert not volume.HasField("content_source")


def test_create_volume_resolves_config_map_name_with_the_injected_reader(
    make_controller: Callable[..., Controller],
) -> None:
    asked: list[str] = []

    def read(name: str) -> Mapping[str, str]:
        asked.append(name)
        return {"storageURL": "s3://legacy/vols", "awsDefaultRegion": "eu-west-1"}

    controller = make_controller(read_config_map=read)
    request = create_request(parameters={"configMapName": "zerofs-settings", "filesystem": "btrfs"})
    context = controller.stub.CreateVolume(request).volume.volume_context
    assert asked == ["zerofs-settings"]
    assert context["storageUrl"] == "s3://legacy/vols"
    assert context["s3Region"] == "eu-west-1"
    assert context["filesystem"] == "btrfs"
    assert "configMapName" not in context


def test_create_volume_is_idempotent(controller: Controller) -> None:
    request = create_request(capacity_range=size(GiB + 1))
    first = controller.stub.CreateVolume(request).volume
    again = controller.stub.CreateVolume(request).volume
    assert again == first
    # The CO's own metadata keys do not make a request different.
    request.parameters["csi.storage.k8s.io/pv/name"] = "pvc-1"
    assert controller.stub.CreateVolume(request).volume == first
    # A range the existing volume satisfies is the same request.
    request.capacity_range.CopyFrom(size(GiB, 2 * GiB))
    assert controller.stub.CreateVolume(request).volume == first
    assert [r.volume_id for r in controller.store.list()] == ["pvc-1"]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"capacity_range": size(2 * GiB)}, ["outside the requested range", "required 2147483648"]),
        ({"capacity_range": size(0, GiB)}, ["outside the requested range", "limit 1073741824"]),
        ({"parameters": {**STORAGE, "filesystem": "xfs"}}, ["other parameters", "filesystem"]),
        ({"parameters": {"storageUrl": "s3://bucket/other"}}, ["differing: storageUrl"]),
    ],
)
def test_create_volume_with_an_incompatible_request_is_already_exists(
    controller: Controller, change: dict[str, Any], needles: list[str]
) -> None:
    original = controller.stub.CreateVolume(create_request(capacity_range=size(GiB + 4096))).volume
    fails(
        lambda: controller.stub.CreateVolume(create_request(**change)),
        grpc.StatusCode.ALREADY_EXISTS,
        "pvc-1",
        *needles,
    )
    stored = controller.store.get("pvc-1")
    assert stored is not None and stored.capacity_bytes == original.capacity_bytes


@pytest.mark.parametrize(
    "name",
    [
        "Sanity Volume",
        "sanity-controller-create-volume-921D6592-4BB15A64",
        "../x",
        "données été",
        "p" * 50,
        "sanity-controller-create-maxlen-" + "0123ABCD" * 12,
    ],
)
def test_any_name_the_spec_allows_creates_a_volume_once(
    controller: Controller, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stub = controller.stub
    assert len(name.encode()) <= 128
    volume = stub.CreateVolume(create_request(name, capacity_range=size(GiB))).volume
    assert volume.volume_id == volume_id_for_name(name)
    assert validate_volume_id(volume.volume_id)
    assert stub.CreateVolume(create_request(name, capacity_range=size(GiB))).volume == volume
    fails(
        lambda: stub.CreateVolume(create_request(name, capacity_range=size(2 * GiB))),
        grpc.StatusCode.ALREADY_EXISTS,
        volume.volume_id,
        "outside the requested range",
    )
    stored = controller.store.get(volume.volume_id)
    assert stored is not None and stored.name == name
    assert [r.__dict__.get("volume_name") for r in caplog.records if r.msg == "volume created"] == [
        name
    ]
    assert [r.volume_id for r in controller.store.list()] == [volume.volume_id]
    got = stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert got.volume == volume
    stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert controller.store.list() == []


def test_a_name_whose_id_is_another_volumes_is_already_exists(controller: Controller) -> None:
    # "Data" maps to data-<hash>, a valid id that is also a name of its own.
    first = controller.stub.CreateVolume(create_request("Data")).volume
    taken = first.volume_id
    fails(
        lambda: controller.stub.CreateVolume(create_request(taken)),
        grpc.StatusCode.ALREADY_EXISTS,
        taken,
        "'Data'",
    )
    stored = controller.store.get(taken)
    assert stored is not None and stored.name == "Data"


def test_concurrent_create_of_one_name_yields_one_volume(
    make_controller: Callable[..., Controller],
) -> None:
    """Threads on one controller and on a second one (a replica) sharing the store."""
    first, second = make_controller(), make_controller()
    outcomes: list[object] = []
    barrier = threading.Barrier(8)

    def create(controller: Controller) -> None:
        barrier.wait()
        try:
            outcomes.append(controller.stub.CreateVolume(create_request(), timeout=30).volume)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=create, args=((first, second)[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    volumes = [o for o in outcomes if isinstance(o, csi_pb2.Volume)]
    others = [o for o in outcomes if not isinstance(o, csi_pb2.Volume)]
    assert len(outcomes) == 8 and volumes
    assert all(v == volumes[0] for v in volumes)
    assert set(others) <= {grpc.StatusCode.ABORTED}
    assert [r.volume_id for r in first.store.list()] == ["pvc-1"]
    # Whoever was ABORTED gets the volume on retry.
    assert first.stub.CreateVolume(create_request()).volume == volumes[0]


# ---------------------------------------------------------------------------- delete


@pytest.mark.parametrize(
    ("volume_id", "needles"),
    [("", ["volume_id is required"]), ("../x", ["volume_id:"]), ("Pvc", ["volume_id:"])],
)
def test_delete_volume_validation(
    controller: Controller, volume_id: str, needles: list[str]
) -> None:
    fails(
        lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        *needles,
    )
    assert controller.remover.removed == []


def test_delete_volume_removes_servers_and_record_and_is_idempotent(
    controller: Controller,
) -> None:
    controller.stub.CreateVolume(create_request())
    controller.stub.CreateVolume(create_request("pvc-2"))
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert controller.store.get("pvc-1") is None
    assert controller.store.get("pvc-2") is not None
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    # An unknown volume (say, one of the Go driver, which kept no record) still has any
    # leftover server removed.
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-unknown"))
    assert controller.remover.removed == ["pvc-1", "pvc-1", "pvc-unknown"]


def test_delete_of_a_published_volume_is_failed_precondition(controller: Controller) -> None:
    controller.stub.CreateVolume(create_request())
    controller.stub.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id="pvc-1", node_id="node-a", volume_capability=mount_cap()
        )
    )
    fails(
        lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "published to node node-a",
    )
    assert controller.store.get("pvc-1") is not None
    assert controller.remover.removed == []


def test_a_failed_server_removal_keeps_the_record(
    make_controller: Callable[..., Controller],
) -> None:
    remover = Recorder(failure=errors.Unavailable("API server unreachable"))
    controller = make_controller(remover=remover)
    controller.stub.CreateVolume(create_request())
    fails(
        lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1")),
        grpc.StatusCode.UNAVAILABLE,
        "API server unreachable",
    )
    assert controller.store.get("pvc-1") is not None
    failures = controller.registry.get_sample_value(
        "zerofs_csi_stage_failures_total",
        {
            "operation": "delete",
            "stage": "remove_server",
            "volume_id": "pvc-1",
            "node": "",
            "reason": "UNAVAILABLE",
        },
    )
    assert failures == 1.0
    remover.failure = None
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert controller.store.get("pvc-1") is None


@dataclass
class DataDeleterRecorder:
    """Records cleanup requests; answers with ``result`` (a count or an error)."""

    result: int | errors.CsiError = 0
    calls: list[tuple[VolumeSettings, str, VolumeSecrets]] = field(default_factory=list)

    def __call__(self, settings: VolumeSettings, volume_id: str, secrets: VolumeSecrets) -> int:
        self.calls.append((settings, volume_id, secrets))
        if isinstance(self.result, errors.CsiError):
            raise self.result
        return self.result


def test_delete_data_only_when_the_storage_class_asks(
    make_controller: Callable[..., Controller],
) -> None:
    deleter = DataDeleterRecorder(result=7)
    controller = make_controller(delete_data=deleter)
    controller.stub.CreateVolume(create_request("keep"))
    controller.stub.CreateVolume(
        create_request(
            "wipe", parameters={**STORAGE, "deleteDataOnPVCDelete": "true"}, secrets=SECRETS
        )
    )
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="keep", secrets=SECRETS))
    assert deleter.calls == []
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="wipe", secrets=SECRETS))
    [(settings, volume_id, secrets)] = deleter.calls
    assert volume_id == "wipe" and settings.delete_data_on_pvc_delete
    assert str(settings.storage_url) == "s3://bucket/volumes"
    assert secrets.encryption_password == PASSWORD
    assert secrets.access_key_id == SECRETS["AWS_ACCESS_KEY_ID"]
    assert controller.objects_deleted() == 7.0
    assert controller.store.list() == []

    # Each volume's series went with it.
    volumes = {s.labels.get("volume_id") for f in controller.registry.collect() for s in f.samples}
    assert volumes == {None}


@pytest.mark.parametrize(
    "failure",
    [
        errors.Unavailable("S3 DeleteObjects still failing after 6 attempts: SlowDown"),
        errors.Internal("S3 ListObjectsV2 failed: AccessDenied (HTTP 403)"),
        errors.FailedPrecondition("refusing to send S3 credentials over plain http"),
    ],
)
def test_a_failed_cleanup_keeps_the_volume_and_is_retryable(
    make_controller: Callable[..., Controller], failure: errors.CsiError
) -> None:
    deleter = DataDeleterRecorder(result=failure)
    controller = make_controller(delete_data=deleter)
    controller.stub.CreateVolume(
        create_request(parameters={**STORAGE, "deleteDataOnPVCDelete": "true"}, secrets=SECRETS)
    )
    delete = csi_pb2.DeleteVolumeRequest(volume_id="pvc-1", secrets=SECRETS)
    details = fails(
        lambda: controller.stub.DeleteVolume(delete),
        grpc.StatusCode.UNAVAILABLE,
        "volume is kept",
        failure.message,
    )
    assert PASSWORD not in details
    assert controller.store.get("pvc-1") is not None
    assert controller.objects_deleted() == 0.0
    deleter.result = 3
    controller.stub.DeleteVolume(delete)
    assert controller.store.get("pvc-1") is None
    assert controller.objects_deleted() == 3.0
    assert len(deleter.calls) == 2


def test_a_cleanup_refused_by_a_guardrail_becomes_an_event(
    make_controller: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    refusal = errors.FailedPrecondition("refusing to delete: prefix does not end with the id")
    controller = make_controller(delete_data=DataDeleterRecorder(result=refusal))
    controller.stub.CreateVolume(
        create_request(parameters={**STORAGE, "deleteDataOnPVCDelete": "true"}, secrets=SECRETS)
    )
    delete = csi_pb2.DeleteVolumeRequest(volume_id="pvc-1", secrets=SECRETS)
    fails(lambda: controller.stub.DeleteVolume(delete), grpc.StatusCode.UNAVAILABLE)
    events = [r for r in caplog.records if r.getMessage().startswith("event:")]
    assert [(e.reason, e.volume_id) for e in events] == [("DataCleanupRefused", "pvc-1")]  # type: ignore[attr-defined]
    assert refusal.message in events[0].getMessage()


def test_delete_data_without_the_provisioner_secret_keeps_the_volume(
    make_controller: Callable[..., Controller],
) -> None:
    deleter = DataDeleterRecorder(result=1)
    controller = make_controller(delete_data=deleter)
    controller.stub.CreateVolume(
        create_request(parameters={**STORAGE, "deleteDataOnPVCDelete": "true"}, secrets=SECRETS)
    )
    fails(
        lambda: controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs the provisioner secret",
    )
    assert deleter.calls == []
    assert controller.store.get("pvc-1") is not None


# ---------------------------------------------------------------------------- publish


def publish_request(
    volume_id: str = "pvc-1", node_id: str = "node-a", **fields: Any
) -> csi_pb2.ControllerPublishVolumeRequest:
    fields.setdefault("volume_capability", mount_cap())
    return csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, **fields)


@pytest.mark.parametrize(
    ("request_", "code", "needles"),
    [
        (publish_request(""), grpc.StatusCode.INVALID_ARGUMENT, ["volume_id is required"]),
        (publish_request("a/b"), grpc.StatusCode.INVALID_ARGUMENT, ["volume_id:"]),
        (publish_request(node_id=""), grpc.StatusCode.INVALID_ARGUMENT, ["node_id is required"]),
        (publish_request(node_id="n" * 300), grpc.StatusCode.INVALID_ARGUMENT, ["node_id"]),
        (
            csi_pb2.ControllerPublishVolumeRequest(volume_id="pvc-1", node_id="node-a"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["volume_capability is required"],
        ),
        (
            publish_request(volume_capability=block_cap(Mode.MULTI_NODE_READER_ONLY)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["MULTI_NODE_READER_ONLY"],
        ),
        (
            publish_request(readonly=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["PUBLISH_READONLY"],
        ),
        (publish_request("pvc-absent"), grpc.StatusCode.NOT_FOUND, ["pvc-absent"]),
        (
            publish_request(node_id="node-gone"),
            grpc.StatusCode.NOT_FOUND,
            ["node 'node-gone' does not exist", "node-a, node-b"],
        ),
    ],
    ids=lambda value: None,
)
def test_publish_validation(
    controller: Controller,
    request_: csi_pb2.ControllerPublishVolumeRequest,
    code: grpc.StatusCode,
    needles: list[str],
) -> None:
    controller.stub.CreateVolume(create_request())
    fails(lambda: controller.stub.ControllerPublishVolume(request_), code, *needles)
    stored = controller.store.get("pvc-1")
    assert stored is not None and stored.published_node is None


def test_publish_to_one_node_at_a_time(controller: Controller) -> None:
    stub = controller.stub
    stub.CreateVolume(create_request())

    def published() -> str | None:
        record = controller.store.get("pvc-1")
        assert record is not None
        return record.published_node

    reply = stub.ControllerPublishVolume(publish_request(node_id="node-a"))
    assert dict(reply.publish_context) == {}
    assert published() == "node-a"
    # Same node again, with another supported capability: idempotent.
    stub.ControllerPublishVolume(publish_request(node_id="node-a", volume_capability=block_cap()))
    fails(
        lambda: stub.ControllerPublishVolume(publish_request(node_id="node-b")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "published to node node-a",
    )
    # Unpublishing from a node it is not published to changes nothing.
    stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1", node_id="node-b")
    )
    assert published() == "node-a"
    stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1", node_id="node-a")
    )
    assert published() is None
    stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1", node_id="node-a")
    )
    stub.ControllerPublishVolume(publish_request(node_id="node-b"))
    assert published() == "node-b"
    # No node id: unpublish from every node.
    stub.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1"))
    assert published() is None


def test_publish_beyond_the_nodes_attach_limit_is_resource_exhausted(
    make_controller: Callable[..., Controller],
) -> None:
    controller = make_controller(nodes=LocalNodes(["node-a", "node-b"], max_volumes_per_node=2))
    stub = controller.stub
    for vid in ("pvc-1", "pvc-2", "pvc-3", "pvc-4"):
        stub.CreateVolume(create_request(vid))
    stub.ControllerPublishVolume(publish_request("pvc-1", "node-a"))
    stub.ControllerPublishVolume(publish_request("pvc-2", "node-a"))
    fails(
        lambda: stub.ControllerPublishVolume(publish_request("pvc-3", "node-a")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "node-a",
        "2 volumes",
    )
    stored = controller.store.get("pvc-3")
    assert stored is not None and stored.published_node is None
    # A volume already there is published again; the limit is per node.
    stub.ControllerPublishVolume(publish_request("pvc-2", "node-a"))
    stub.ControllerPublishVolume(publish_request("pvc-3", "node-b"))
    stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1", node_id="node-a")
    )
    stub.ControllerPublishVolume(publish_request("pvc-4", "node-a"))
    published = {r.volume_id: r.published_node for r in controller.store.list()}
    assert published == {"pvc-1": None, "pvc-2": "node-a", "pvc-3": "node-b", "pvc-4": "node-a"}


def test_concurrent_publishes_to_a_full_node_stay_within_its_limit(
    make_controller: Callable[..., Controller],
) -> None:
    controller = make_controller(nodes=LocalNodes(["node-a"], max_volumes_per_node=3))
    volumes = [f"pvc-{i}" for i in range(12)]
    for vid in volumes:
        controller.stub.CreateVolume(create_request(vid))
    barrier = threading.Barrier(len(volumes))
    outcomes: list[grpc.StatusCode] = []

    def publish(vid: str) -> None:
        barrier.wait()
        try:
            controller.stub.ControllerPublishVolume(publish_request(vid, "node-a"), timeout=30)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=publish, args=(vid,)) for vid in volumes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o.name for o in outcomes) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 9
    published = [r.volume_id for r in controller.store.list() if r.published_node == "node-a"]
    assert len(published) == 3


@pytest.mark.parametrize(
    ("volume_id", "code"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("../x", grpc.StatusCode.INVALID_ARGUMENT),
        ("pvc-absent", grpc.StatusCode.OK),
    ],
)
def test_unpublish_validation(
    controller: Controller, volume_id: str, code: grpc.StatusCode
) -> None:
    request = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id="node-a")
    if code is grpc.StatusCode.OK:
        controller.stub.ControllerUnpublishVolume(request)
    else:
        fails(lambda: controller.stub.ControllerUnpublishVolume(request), code, "volume_id")


def test_a_busy_volume_is_aborted(make_controller: Callable[..., Controller]) -> None:
    entered, release = threading.Event(), threading.Event()
    remover = Recorder()

    def slow_remove(volume_id: str) -> None:
        entered.set()
        assert release.wait(30)
        remover(volume_id)

    controller = make_controller(remover=slow_remove)  # type: ignore[arg-type]
    controller.stub.CreateVolume(create_request())
    pending = controller.stub.DeleteVolume.future(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert entered.wait(30)
    try:
        fails(
            lambda: controller.stub.ControllerPublishVolume(publish_request()),
            grpc.StatusCode.ABORTED,
            "busy with DeleteVolume",
        )
    finally:
        release.set()
    pending.result(timeout=30)
    assert remover.removed == ["pvc-1"]


# ---------------------------------------------------------------------------- validate


def validate_request(
    volume_id: str = "pvc-1", **fields: Any
) -> csi_pb2.ValidateVolumeCapabilitiesRequest:
    fields.setdefault("volume_capabilities", [mount_cap()])
    return csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, **fields)


def test_validate_volume_capabilities(controller: Controller) -> None:
    volume = controller.stub.CreateVolume(create_request()).volume
    stub = controller.stub
    caps = [
        mount_cap(),
        mount_cap(Mode.SINGLE_NODE_READER_ONLY, "xfs"),
        block_cap(Mode.SINGLE_NODE_SINGLE_WRITER),
        block_cap(Mode.SINGLE_NODE_MULTI_WRITER),
    ]
    reply = stub.ValidateVolumeCapabilities(
        validate_request(
            volume_capabilities=caps,
            volume_context=volume.volume_context,
            parameters={**STORAGE, "csi.storage.k8s.io/pvc/name": "data"},
        )
    )
    assert list(reply.confirmed.volume_capabilities) == caps
    assert dict(reply.confirmed.volume_context) == dict(volume.volume_context)
    assert not reply.message

    for request, needle in [
        (
            validate_request(
                volume_capabilities=[mount_cap(), block_cap(Mode.MULTI_NODE_MULTI_WRITER)]
            ),
            "volume_capabilities[1]: access mode MULTI_NODE_MULTI_WRITER",
        ),
        (validate_request(volume_capabilities=[mount_cap(fs_type="vfat")]), "'vfat'"),
        (validate_request(volume_context={"capacityBytes": "1"}), "volume_context differs"),
        (validate_request(parameters={"storageUrl": "s3://x/y"}), "parameters differ"),
        (validate_request(mutable_parameters={"a": "b"}), "mutable_parameters"),
    ]:
        reply = stub.ValidateVolumeCapabilities(request)
        assert not reply.HasField("confirmed"), needle
        assert needle in reply.message


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (validate_request(""), grpc.StatusCode.INVALID_ARGUMENT),
        (validate_request("a..b"), grpc.StatusCode.INVALID_ARGUMENT),
        (validate_request(volume_capabilities=[]), grpc.StatusCode.INVALID_ARGUMENT),
        (validate_request("pvc-absent"), grpc.StatusCode.NOT_FOUND),
    ],
    ids=["empty id", "bad id", "no capabilities", "unknown volume"],
)
def test_validate_volume_capabilities_errors(
    controller: Controller,
    request_: csi_pb2.ValidateVolumeCapabilitiesRequest,
    code: grpc.StatusCode,
) -> None:
    controller.stub.CreateVolume(create_request())
    fails(lambda: controller.stub.ValidateVolumeCapabilities(request_), code)


# ---------------------------------------------------------------------------- expand


def expand_request(
    volume_id: str = "pvc-1", **fields: Any
) -> csi_pb2.ControllerExpandVolumeRequest:
    return csi_pb2.ControllerExpandVolumeRequest(volume_id=volume_id, **fields)


@pytest.mark.parametrize(
    ("request_", "code", "needles"),
    [
        (expand_request(""), grpc.StatusCode.INVALID_ARGUMENT, ["volume_id is required"]),
        (expand_request(), grpc.StatusCode.INVALID_ARGUMENT, ["required_bytes is required"]),
        (
            expand_request(capacity_range=size(0, 4 * GiB)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["required_bytes is required"],
        ),
        (
            expand_request(capacity_range=size(3 * GiB, 2 * GiB)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["greater than limit_bytes"],
        ),
        (
            expand_request(capacity_range=size(GiB, GiB)),
            grpc.StatusCode.OUT_OF_RANGE,
            ["already has 2147483648 bytes", "never shrink"],
        ),
        (
            expand_request(
                capacity_range=size(4 * GiB),
                volume_capability=mount_cap(Mode.MULTI_NODE_MULTI_WRITER),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["volume_capability"],
        ),
        (
            expand_request("pvc-absent", capacity_range=size(4 * GiB)),
            grpc.StatusCode.NOT_FOUND,
            ["pvc-absent"],
        ),
    ],
    ids=lambda value: None,
)
def test_expand_validation(
    controller: Controller,
    request_: csi_pb2.ControllerExpandVolumeRequest,
    code: grpc.StatusCode,
    needles: list[str],
) -> None:
    controller.stub.CreateVolume(create_request(capacity_range=size(2 * GiB)))
    fails(lambda: controller.stub.ControllerExpandVolume(request_), code, *needles)
    stored = controller.store.get("pvc-1")
    assert stored is not None and stored.capacity_bytes == 2 * GiB


def test_expand_records_the_rounded_size_and_never_shrinks(controller: Controller) -> None:
    stub = controller.stub
    created = stub.CreateVolume(create_request(capacity_range=size(GiB))).volume
    reply = stub.ControllerExpandVolume(
        expand_request(capacity_range=size(3 * GiB + 1), volume_capability=block_cap())
    )
    assert (reply.capacity_bytes, reply.node_expansion_required) == (3 * GiB + 4096, True)
    got = stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1"))
    assert got.volume.capacity_bytes == 3 * GiB + 4096
    # The volume context is what the CO keeps from CreateVolume: unchanged.
    assert got.volume.volume_context == created.volume_context
    # Asking again, or for less, answers the current size and still asks for the node step.
    for smaller in (3 * GiB + 1, 2 * GiB):
        reply = stub.ControllerExpandVolume(expand_request(capacity_range=size(smaller)))
        assert (reply.capacity_bytes, reply.node_expansion_required) == (3 * GiB + 4096, True)
    # A retried CreateVolume with the original range is still the same volume.
    assert stub.CreateVolume(create_request(capacity_range=size(GiB))).volume.volume_id == "pvc-1"


# ---------------------------------------------------------------------------- list / get


def test_list_volumes_pages_and_reports_published_nodes(controller: Controller) -> None:
    stub = controller.stub
    assert list(stub.ListVolumes(csi_pb2.ListVolumesRequest()).entries) == []
    for vid in ("pvc-5", "pvc-1", "pvc-3", "pvc-2", "pvc-4"):
        stub.CreateVolume(create_request(vid))
    stub.ControllerPublishVolume(publish_request("pvc-3", "node-b"))

    everything = stub.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in everything.entries] == [f"pvc-{i}" for i in range(1, 6)]
    assert everything.next_token == ""
    assert {e.volume.volume_id: list(e.status.published_node_ids) for e in everything.entries}[
        "pvc-3"
    ] == ["node-b"]
    assert everything.entries[0].volume.volume_context["storageUrl"] == STORAGE["storageUrl"]

    seen, token, pages = [], "", 0
    while True:
        page = stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        pages += 1
        token = page.next_token
        if not token:
            break
        # The last volume of a page deleted before the next page does not break the listing.
        if pages == 1:
            stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=seen[-1]))
    assert seen == ["pvc-1", "pvc-2", "pvc-3", "pvc-4", "pvc-5"]
    assert pages == 3


def test_list_volumes_errors(controller: Controller) -> None:
    fails(
        lambda: controller.stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_entries",
    )
    controller.stub.CreateVolume(create_request("pvc-1"))
    # Tokens are only what a ListVolumes answered: csi-sanity's "invalid-token", which
    # looks like a volume id, and a volume id itself are not.
    for token in ("../../x", "invalid-token", "pvc-1", "after:", "after:../x"):
        fails(
            lambda token=token: controller.stub.ListVolumes(
                csi_pb2.ListVolumesRequest(starting_token=token)
            ),
            grpc.StatusCode.ABORTED,
            "starting_token",
        )


def test_controller_get_volume(controller: Controller) -> None:
    stub = controller.stub
    created = stub.CreateVolume(create_request()).volume
    stub.ControllerPublishVolume(publish_request())
    got = stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-1"))
    assert got.volume == created
    assert list(got.status.published_node_ids) == ["node-a"]
    fails(
        lambda: stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="pvc-9")),
        grpc.StatusCode.NOT_FOUND,
    )
    fails(
        lambda: stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# ---------------------------------------------------------------------------- capabilities


def test_capabilities_are_exactly_what_is_implemented(controller: Controller) -> None:
    RPC = csi_pb2.ControllerServiceCapability.RPC
    reply = controller.stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    advertised = {c.rpc.type for c in reply.capabilities}
    assert advertised == {
        RPC.CREATE_DELETE_VOLUME,
        RPC.PUBLISH_UNPUBLISH_VOLUME,
        RPC.EXPAND_VOLUME,
        RPC.LIST_VOLUMES,
        RPC.LIST_VOLUMES_PUBLISHED_NODES,
        RPC.GET_VOLUME,
        RPC.SINGLE_NODE_MULTI_WRITER,
    }
    assert len(reply.capabilities) == len(advertised)


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("GetCapacity", csi_pb2.GetCapacityRequest()),
        ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="pvc-1")),
        ("DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id="s")),
        ("ListSnapshots", csi_pb2.ListSnapshotsRequest()),
        ("ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest(volume_id="pvc-1")),
    ],
)
def test_what_is_not_advertised_is_unimplemented(
    controller: Controller, method: str, request_: Any
) -> None:
    fails(lambda: getattr(controller.stub, method)(request_), grpc.StatusCode.UNIMPLEMENTED, method)


# ---------------------------------------------------------------------------- restart


def test_state_survives_a_controller_restart(make_controller: Callable[..., Controller]) -> None:
    before = make_controller()
    created = before.stub.CreateVolume(create_request(capacity_range=size(2 * GiB))).volume
    before.stub.ControllerPublishVolume(publish_request(node_id="node-a"))
    before.stub.ControllerExpandVolume(expand_request(capacity_range=size(3 * GiB)))
    before.stop()

    after = make_controller()
    stub = after.stub
    listed = stub.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [(e.volume.volume_id, e.volume.capacity_bytes) for e in listed] == [("pvc-1", 3 * GiB)]
    assert list(listed[0].status.published_node_ids) == ["node-a"]
    # The CO's retry of CreateVolume after the restart gets the same volume.
    again = stub.CreateVolume(create_request(capacity_range=size(2 * GiB))).volume
    assert again.volume_context == created.volume_context
    fails(
        lambda: stub.ControllerPublishVolume(publish_request(node_id="node-b")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "node-a",
    )
    fails(
        lambda: stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    stub.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id="pvc-1", node_id="node-a")
    )
    stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1"))
    assert after.store.list() == []


# ---------------------------------------------------------------------------- real S3


def _s3_helpers(name: str) -> Any:
    """A module of tests/s3, whose folder is not on this one's import path."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "s3"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def radosgw() -> Iterator[Any]:
    """A radosgw for this module (tests/s3/radosgw.py starts and stops it)."""
    helpers = _s3_helpers("radosgw")
    try:
        helpers.ensure_installed()
    except helpers.RadosGatewayUnavailable as exc:
        pytest.skip(str(exc))
    gateway = helpers.RadosGateway(Path(tempfile.mkdtemp(prefix="zerofs-csi-rgw-")))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()


@pytest.mark.s3
def test_delete_volume_deletes_only_the_volumes_objects_in_real_s3(
    make_controller: Callable[..., Controller], radosgw: Any
) -> None:
    s3 = _s3_helpers("s3store").client_of(radosgw)
    bucket = "controller-cleanup"
    s3.create_bucket(Bucket=bucket)
    ours = [f"vols/pvc-1/wal/{i:04d}" for i in range(1203)] + ["vols/pvc-1/manifest"]
    theirs = ["vols/pvc-10/manifest", "vols/pvc-1", "vols/pvc-1x/a", "pvc-1/manifest", "root"]
    with futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), ours + theirs))

    controller = make_controller()
    parameters = {
        "storageUrl": f"s3://{bucket}/vols",
        "s3Endpoint": radosgw.endpoint,
        "s3AllowHttp": "true",
        "s3Region": radosgw.region,
        "deleteDataOnPVCDelete": "true",
    }
    good = {
        "ZEROFS_ENCRYPTION_PASSWORD": PASSWORD,
        "AWS_ACCESS_KEY_ID": radosgw.access_key,
        "AWS_SECRET_ACCESS_KEY": radosgw.secret_key,
    }
    controller.stub.CreateVolume(create_request(parameters=parameters, secrets=good))

    # Credentials the store refuses: nothing deleted, the volume kept, a retryable code.
    wrong = {**good, "AWS_SECRET_ACCESS_KEY": "not-the-right-secret-key"}
    details = fails(
        lambda: controller.stub.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id="pvc-1", secrets=wrong)
        ),
        grpc.StatusCode.UNAVAILABLE,
        "volume is kept",
        "HTTP 403",
    )
    assert "not-the-right-secret-key" not in details and radosgw.secret_key not in details
    assert controller.store.get("pvc-1") is not None
    assert controller.objects_deleted() == 0.0

    def keys() -> list[str]:
        paginator = s3.get_paginator("list_objects_v2")
        return sorted(
            entry["Key"]
            for page in paginator.paginate(Bucket=bucket)
            for entry in page.get("Contents", [])
        )

    assert keys() == sorted(ours + theirs)

    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1", secrets=good))
    assert keys() == sorted(theirs)
    assert controller.objects_deleted() == float(len(ours))
    assert controller.store.get("pvc-1") is None
    # Deleting again: the volume is gone, nothing else is touched.
    controller.stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="pvc-1", secrets=good))
    assert keys() == sorted(theirs)
    for key in theirs:
        s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)
