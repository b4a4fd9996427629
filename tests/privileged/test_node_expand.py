"""NodeExpandVolume through the gRPC API: offline growth of each filesystem and of a block
volume, refused while published. A filesystem grows with its one publication at the
request's volume_path in place, as kubelet asks on mount before it starts the pod's
containers, unless a container holds that publication after all.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_node_expand.py
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, KernelLog, MiB, Volume, VolumeFactory, filesystem_uuid

from zerofs_csi.csi import csi_pb2

pytestmark = pytest.mark.privileged

SIZES = {"ext4": 128 * MiB, "xfs": 320 * MiB, "btrfs": 256 * MiB, "": 64 * MiB}


def expand(volume: Volume, new_size: int, volume_path: str) -> int:
    controller = volume.plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
            volume_capability=volume.capability,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert controller.node_expansion_required
    reply = volume.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id,
            volume_path=volume_path,
            staging_target_path=volume.staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=controller.capacity_bytes),
            volume_capability=volume.capability,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return int(reply.capacity_bytes)


def expand_refused(volume: Volume, new_size: int, volume_path: str) -> str:
    """The details of the FAILED_PRECONDITION the expansion gets; the device kept its size."""
    size = device_size(volume.device())
    with pytest.raises(grpc.RpcError) as refused:
        expand(volume, new_size, volume_path)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert device_size(volume.device()) == size
    return str(refused.value.details())


@contextlib.contextmanager
def holding_a_copy_of_the_mounts() -> Iterator[None]:
    """A process in a mount namespace of its own, as a container's: it holds a private
    copy of every mount there is now, which this namespace can neither see nor unmount."""
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "echo ready; exec sleep 600",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs"])
def test_filesystem_grows_offline(
    volumes: VolumeFactory, fs_type: str, kernel_log: KernelLog
) -> None:
    old_size = SIZES[fs_type]
    volume = volumes(fs_type=fs_type, size=old_size)
    volume.stage()
    uuid = filesystem_uuid(volume.device())
    target = volume.plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    payload = os.urandom(2 * MiB)
    (target / "data").write_bytes(payload)
    old_total = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize

    # Another publication of the volume is in use as far as the driver knows.
    other = volume.plugin.workdir / "pods" / f"{volume.volume_id}-other"
    volume.publish(str(other))
    refused = expand_refused(volume, 2 * old_size, str(target))
    assert f"published at {other};" in refused, refused  # and only there
    volume.unpublish(str(other))

    # A container's private copy of the publication holds the filesystem.
    with holding_a_copy_of_the_mounts():
        refused = expand_refused(volume, 2 * old_size, str(target))
        assert "still mounted elsewhere" in refused
    assert (target / "data").read_bytes() == payload, "the publication was put back"

    # kubelet's expansion on mount: the pod's publication is made, its containers not.
    assert expand(volume, 2 * old_size, str(target)) == 2 * old_size
    assert device_size(volume.device()) == 2 * old_size
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > old_total + old_size // 2
    assert (target / "data").read_bytes() == payload

    volume.unpublish(str(target))
    staging_mount = str(Path(volume.staging) / "mount")
    assert filesystem_uuid(volume.device()) == uuid
    assert expand(volume, 2 * old_size, staging_mount) == 2 * old_size  # idempotent
    # Without a capacity range the filesystem fills the device it has.
    reply = volume.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id,
            volume_path=staging_mount,
            staging_target_path=volume.staging,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert reply.capacity_bytes == 2 * old_size

    volume.publish(str(target))
    assert (target / "data").read_bytes() == payload
    stats = volume.stats(str(target))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    # Nothing failed on the way, udev's probe of each reattached device included.
    assert not kernel_log.forbidden, kernel_log.forbidden


def test_block_volume_grows_offline(volumes: VolumeFactory) -> None:
    old_size = SIZES[""]
    volume = volumes(block=True, size=old_size)
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    payload = os.urandom(MiB)
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, payload, old_size - MiB)
        os.fsync(fd)
    finally:
        os.close(fd)

    with pytest.raises(grpc.RpcError) as refused:
        expand(volume, 2 * old_size, str(target))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    volume.unpublish(str(target))
    assert expand(volume, 2 * old_size, volume.staging) == 2 * old_size
    volume.publish(str(target))
    assert device_size(str(target)) == 2 * old_size
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert os.pread(fd, MiB, old_size - MiB) == payload
        os.pwrite(fd, payload, 2 * old_size - MiB)  # the new space is writable
        os.fsync(fd)
        assert os.pread(fd, MiB, 2 * old_size - MiB) == payload
    finally:
        os.close(fd)
