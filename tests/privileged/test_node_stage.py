"""The Node service through its gRPC API against the real kernel: stage, publish, stats.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_stage.py
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from functools import partial
from pathlib import Path

import grpc
import pytest
from conftest import (
    NODE_ID,
    KernelLog,
    MiB,
    Mode,
    PluginProcess,
    Volume,
    VolumeFactory,
    assert_code,
    assert_nbd_devices,
    assert_unstaged,
    block_capability,
    filesystem_uuid,
    mount_capability,
    mounts_under,
    processes_mentioning,
    settled_nbd_devices,
    wait_until,
)

from zerofs_csi.csi import csi_pb2
from zerofs_csi.host import mounts
from zerofs_csi.nbd import attach as nbd

pytestmark = pytest.mark.privileged

# xfsprogs refuses filesystems under 300 MiB; the exports are sparse files either way.
SIZES = {"ext4": 128 * MiB, "xfs": 320 * MiB, "btrfs": 256 * MiB}
DATA_MIB = 4


def write_file(path: Path, mib: int, seed: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = hashlib.sha256(seed + i.to_bytes(4, "little")).digest() * (MiB // 32)
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def digest_of(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(MiB if remaining is None else min(MiB, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs"])
def test_filesystem_life(volumes: VolumeFactory, fs_type: str, kernel_log: KernelLog) -> None:
    volume = volumes(fs_type=fs_type, size=SIZES[fs_type], mount_flags=("noatime", "nodev"))
    volume.stage()
    device = volume.device()
    mount = mounts.find_mount(Path(volume.staging) / "mount")
    assert mount is not None and mount.fstype == fs_type and mount.source == device
    assert {"noatime", "nodev", "rw"} <= set(mount.options)
    uuid = filesystem_uuid(device)
    assert uuid

    volume.stage()  # idempotent: same device, nothing remade
    assert volume.device() == device and filesystem_uuid(device) == uuid
    assert len(mounts_under(Path(volume.staging))) == 1

    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    volume.publish(str(target))  # idempotent
    assert len(mounts_under(target)) == 1
    assert_code(lambda: volume.publish(str(target), readonly=True), grpc.StatusCode.ALREADY_EXISTS)

    digest = write_file(target / "data.bin", DATA_MIB, fs_type.encode())
    (target / "dir").mkdir()

    readonly_target = volume.plugin.workdir / "pods" / volume.volume_id / "readonly"
    volume.publish(str(readonly_target), readonly=True)
    volume.publish(str(readonly_target), readonly=True)
    assert digest_of(readonly_target / "data.bin") == digest
    with pytest.raises(OSError) as denied:
        (readonly_target / "new").write_bytes(b"x")
    assert denied.value.errno == errno.EROFS
    assert_code(
        lambda: volume.publish(str(readonly_target), readonly=False),
        grpc.StatusCode.ALREADY_EXISTS,
    )

    stats = volume.stats(str(target))
    units = {u.unit: u for u in stats.usage}
    Unit = csi_pb2.VolumeUsage.Unit
    assert set(units) == {Unit.BYTES, Unit.INODES}
    size_bytes = units[Unit.BYTES]
    assert 0.5 * SIZES[fs_type] < size_bytes.total <= SIZES[fs_type]
    assert size_bytes.used >= DATA_MIB * MiB
    assert 0 < size_bytes.available < size_bytes.total
    if fs_type != "btrfs":  # btrfs allocates inodes dynamically and reports 0 total
        inodes = units[Unit.INODES]
        assert inodes.total > 0 and 2 <= inodes.used < inodes.total
    assert not stats.volume_condition.abnormal, stats.volume_condition.message

    for path in (readonly_target, target):
        volume.unpublish(str(path))
        volume.unpublish(str(path))  # idempotent
        assert not path.exists()
    volume.unstage()
    volume.unstage()  # idempotent
    assert_unstaged(volume)

    volume.stage()  # existing filesystem: no mkfs
    assert filesystem_uuid(volume.device()) == uuid
    volume.publish(str(target))
    assert digest_of(target / "data.bin") == digest
    assert (target / "dir").is_dir()
    # Nothing failed on the way, udev's probe of the unstaged device included.
    assert not kernel_log.forbidden, kernel_log.forbidden


def test_block_life(volumes: VolumeFactory) -> None:
    size = 64 * MiB
    volume = volumes(block=True, size=size)
    volume.stage()
    volume.stage()
    device = volume.device()
    assert not (Path(volume.staging) / "mount").exists()

    target = volume.plugin.workdir / "pods" / volume.volume_id / "dev"
    volume.publish(str(target))
    volume.publish(str(target))
    assert stat.S_ISBLK(target.stat().st_mode)
    assert os.stat(target).st_rdev == os.stat(device).st_rdev

    offset = 3 * MiB
    payload = os.urandom(2 * MiB)
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == size
        os.pwrite(fd, payload, offset)
        os.fsync(fd)
    finally:
        os.close(fd)

    stats = volume.stats(str(target))
    assert [u.total for u in stats.usage] == [size]
    assert not stats.volume_condition.abnormal

    volume.unpublish(str(target))
    volume.unpublish(str(target))
    assert not target.exists()
    volume.unstage()
    volume.unstage()
    assert_unstaged(volume)

    volume.stage()
    volume.publish(str(target))
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert os.pread(fd, len(payload), offset) == payload
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("parameter", "connections"), [({"nbdConnections": "4"}, 4), ({}, nbd.DEFAULT_CONNECTIONS)]
)
def test_nbd_connections_follow_the_storage_class(
    volumes: VolumeFactory, parameter: dict[str, str], connections: int
) -> None:
    volume = volumes(size=SIZES["ext4"], parameters=parameter)
    volume.stage()
    index = int(volume.device().removeprefix("/dev/nbd"))
    queues = [e for e in os.listdir(f"/sys/block/nbd{index}/mq") if e.isdigit()]
    assert len(queues) == nbd.hardware_queues_for(connections)
    assert volume.record()["connections"] == connections
    volume.unstage()
    assert_unstaged(volume)


def test_publish_needs_a_staged_volume_of_the_same_kind(volumes: VolumeFactory) -> None:
    volume = volumes(fs_type="ext4", size=SIZES["ext4"])
    target = str(volume.plugin.workdir / "pods" / volume.volume_id / "volume")
    assert_code(lambda: volume.publish(target), grpc.StatusCode.FAILED_PRECONDITION)
    volume.stage()
    assert_code(
        lambda: volume.publish(target, capability=block_capability()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert_code(lambda: volume.stage(block_capability()), grpc.StatusCode.ALREADY_EXISTS)
    # A writable stage is not a read-only one, whatever the kind.
    many = mount_capability("ext4", mode=Mode.MULTI_NODE_READER_ONLY)
    details = assert_code(lambda: volume.stage(many), grpc.StatusCode.ALREADY_EXISTS)
    assert "asks for read-only mount ext4" in details
    assert not Path(target).exists()


def test_unstage_while_published_and_a_second_staging_path_are_refused(
    volumes: VolumeFactory,
) -> None:
    volume = volumes(fs_type="ext4", size=SIZES["ext4"])
    volume.stage()
    device = volume.device()
    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    details = assert_code(volume.unstage, grpc.StatusCode.FAILED_PRECONDITION)
    assert str(target) in details
    (target / "still-here").write_bytes(b"ok")

    other = Volume(
        plugin=volume.plugin,
        volume_id=volume.volume_id,
        context=volume.context,
        fs_type=volume.fs_type,
        staging=volume.staging + "-other",
        capability=volume.capability,
    )
    details = assert_code(other.stage, grpc.StatusCode.FAILED_PRECONDITION)
    assert volume.staging in details
    assert not Path(other.staging, "zerofs-volume.json").exists()
    assert volume.device() == device
    assert (target / "still-here").read_bytes() == b"ok"
    volume.unpublish(str(target))
    volume.unstage()
    assert_unstaged(volume)


def test_stage_over_a_different_filesystem_fails_and_undoes(volumes: VolumeFactory) -> None:
    volume = volumes(fs_type="ext4", size=SIZES["ext4"])
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    digest = write_file(target / "data.bin", 1, b"keep")
    volume.unpublish(str(target))
    uuid = filesystem_uuid(volume.device())
    volume.unstage()
    devices = settled_nbd_devices()

    details = assert_code(
        lambda: volume.stage(mount_capability("xfs")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "ext4" in details
    assert_nbd_devices(devices)
    assert_unstaged(volume)

    volume.stage()
    assert filesystem_uuid(volume.device()) == uuid
    volume.publish(str(target))
    assert digest_of(target / "data.bin") == digest


def _bad_requests(volume: Volume, staging: str) -> dict[str, csi_pb2.NodeStageVolumeRequest]:
    def request(**changes: object) -> csi_pb2.NodeStageVolumeRequest:
        fields: dict[str, object] = {
            "volume_id": volume.volume_id,
            "staging_target_path": staging,
            "volume_capability": mount_capability("ext4"),
            "volume_context": volume.context,
            "secrets": {"ZEROFS_ENCRYPTION_PASSWORD": "x"},
        }
        fields.update(changes)
        return csi_pb2.NodeStageVolumeRequest(**fields)  # type: ignore[arg-type]

    return {
        "parent id": request(volume_id="../x"),
        "slash id": request(volume_id="a/b"),
        "empty id": request(volume_id=""),
        "multi-node writer": request(
            volume_capability=mount_capability("ext4", mode=Mode.MULTI_NODE_MULTI_WRITER)
        ),
        "no capability": request(volume_capability=None),
        "no staging path": request(staging_target_path=""),
        "relative staging path": request(staging_target_path="kubelet/staging"),
        "unknown filesystem": request(volume_capability=mount_capability("ntfs")),
        "unknown filesystem in context": request(
            volume_context={**volume.context, "filesystem": "zfs"}
        ),
        "no capacity in context": request(
            volume_context={k: v for k, v in volume.context.items() if k != "capacityBytes"}
        ),
        "no secrets": request(secrets={}),
        "forbidden mount option": request(
            volume_capability=mount_capability("ext4", flags=("remount",))
        ),
    }


def test_bad_stage_requests_leave_nothing_behind(
    plugin: PluginProcess, volumes: VolumeFactory
) -> None:
    volume = volumes(fs_type="ext4", size=SIZES["ext4"])
    staging = str(plugin.workdir / "kubelet" / "bad-staging")
    devices = settled_nbd_devices()
    servers = plugin.server_processes()
    for name, request in _bad_requests(volume, staging).items():
        with pytest.raises(grpc.RpcError) as info:
            plugin.node.NodeStageVolume(request, timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value.details())
        assert "node-test" not in str(info.value.details())
    assert_nbd_devices(devices)
    assert plugin.server_processes() == servers
    assert not mounts_under(plugin.workdir)
    assert not Path(staging).exists()
    assert not list((plugin.state_dir / "staged").glob("*.json"))


def test_other_rpcs_reject_bad_input(plugin: PluginProcess) -> None:
    node = plugin.node
    target = str(plugin.workdir / "pods" / "x" / "volume")
    cases = {
        "unstage unsafe id": lambda: node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id="../x", staging_target_path=target)
        ),
        "unstage no path": lambda: node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id="pvc-x")
        ),
        "publish no target": lambda: node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id="pvc-x",
                staging_target_path=target,
                volume_capability=mount_capability("ext4"),
            )
        ),
        "publish multi-node": lambda: node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id="pvc-x",
                staging_target_path=target,
                target_path=target,
                volume_capability=mount_capability("ext4", mode=Mode.MULTI_NODE_MULTI_WRITER),
            )
        ),
        "unpublish unsafe id": lambda: node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="../x", target_path=target)
        ),
        "stats no path": lambda: node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id="pvc-x")
        ),
    }
    for name, call in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value.details())
    # Unpublishing and unstaging what is not there succeed.
    node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="pvc-x", target_path=target)
    )
    node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id="pvc-x", staging_target_path=target)
    )
    # Required fields first, then whether the volume is here: NOT_FOUND, whatever the path.
    not_found = {
        "stats": lambda path: node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id="pvc-x", volume_path=path)
        ),
        "expand": lambda path: node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id="pvc-x",
                volume_path=path,
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            )
        ),
        # capacity_range is optional in NodeExpandVolume (csi.proto).
        "expand without capacity": lambda path: node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(volume_id="pvc-x", volume_path=path)
        ),
    }
    for name, call in not_found.items():
        for path in (target, "some/path"):
            with pytest.raises(grpc.RpcError) as info:
                call(path)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, (name, path)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_stats_answer_for_the_volume_s_own_paths_only(volumes: VolumeFactory, block: bool) -> None:
    size = SIZES["ext4"]
    volume = volumes(fs_type="ext4", size=size, block=block)
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    # The spec: "any valid path where volume was previously staged or published".
    for path in (str(target), volume.staging):
        totals = [u.total for u in volume.stats(path).usage]
        assert 0.5 * size < totals[0] <= size, (path, totals)
    elsewhere = volume.plugin.workdir / "pods"
    for path in ("some/path", str(elsewhere), str(target) + "-missing"):
        assert_code(partial(volume.stats, path), grpc.StatusCode.NOT_FOUND)


def test_info_and_capabilities(plugin: PluginProcess) -> None:
    info = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert info.max_volumes_per_node == 0
    reply = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    RPC = csi_pb2.NodeServiceCapability.RPC
    kinds = {c.rpc.type for c in reply.capabilities}
    assert {
        RPC.STAGE_UNSTAGE_VOLUME,
        RPC.GET_VOLUME_STATS,
        RPC.EXPAND_VOLUME,
        RPC.VOLUME_CONDITION,
    } <= kinds


def test_concurrent_operations_on_one_volume_are_aborted(volumes: VolumeFactory) -> None:
    volume = volumes(block=True, size=64 * MiB)
    first = volume.node.NodeStageVolume.future(volume.stage_request(), timeout=300)
    wait_until(
        lambda: Path(volume.staging).exists() or first.done(),  # made under the volume's lock
        120,
        "the first stage to start",
        0.01,
    )
    assert not first.done(), "the stage finished before a second call could overlap it"
    assert_code(volume.stage, grpc.StatusCode.ABORTED)
    assert_code(volume.unstage, grpc.StatusCode.ABORTED)
    first.result()
    volume.stage()


@pytest.mark.parametrize(
    ("mode", "code", "needle"),
    [
        # A read-write server, but nothing may format the device read-only.
        (
            Mode.SINGLE_NODE_READER_ONLY,
            grpc.StatusCode.FAILED_PRECONDITION,
            "has no filesystem yet and is staged read-only",
        ),
        # A read-only server of storage that was never written does not start (the
        # stand-in finds no export directory to serve): the stage fails with its reason,
        # to be retried. The controller creates no such volume.
        (Mode.MULTI_NODE_READER_ONLY, grpc.StatusCode.UNAVAILABLE, "exited with status 1"),
    ],
    ids=["single-node", "many-nodes"],
)
def test_read_only_stage_of_a_fresh_volume_is_refused(
    volumes: VolumeFactory, mode: int, code: grpc.StatusCode, needle: str
) -> None:
    volume = volumes(fs_type="ext4", size=SIZES["ext4"])
    devices = settled_nbd_devices()
    details = assert_code(lambda: volume.stage(mount_capability("ext4", mode=mode)), code)
    assert needle in details
    assert_nbd_devices(devices)
    assert_unstaged(volume)
    assert not processes_mentioning(f"/{volume.volume_id}/")


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_read_only_many_is_served_by_a_read_only_server(
    volumes: VolumeFactory, fs_type: str, kernel_log: KernelLog
) -> None:
    volume = volumes(fs_type=fs_type, size=SIZES[fs_type])
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    digest = write_file(target / "data.bin", 1, b"many-readers")
    volume.unpublish(str(target))
    volume.unstage()

    many = mount_capability(fs_type, mode=Mode.MULTI_NODE_READER_ONLY)
    volume.stage(many)
    # The server runs read-only, and the kernel made its device read-only.
    servers = processes_mentioning(f"/{volume.volume_id}/")
    assert any("--read-only" in line for _, line in servers), servers
    device = volume.device()
    assert Path(f"/sys/block/{Path(device).name}/ro").read_text().strip() == "1"
    mount = mounts.find_mount(Path(volume.staging) / "mount")
    assert mount is not None and "ro" in mount.options
    volume.publish(str(target), capability=many)
    assert digest_of(target / "data.bin") == digest
    with pytest.raises(OSError) as denied:
        (target / "new").write_bytes(b"x")
    assert denied.value.errno == errno.EROFS
    volume.unpublish(str(target))
    volume.unstage()
    assert_unstaged(volume)
    assert not processes_mentioning(f"/{volume.volume_id}/")
    assert not kernel_log.forbidden, kernel_log.forbidden
