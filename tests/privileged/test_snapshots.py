"""Snapshots of a staged, mounted volume through the CSI API, restored into a new volume.

The plugin (``--role all``, local backend, the ZeroFS stand-in) checkpoints a volume
whose filesystem is mounted and written to through its running server's admin socket;
a volume created from the snapshot is then staged and must hold the files as of the
snapshot, not what was written after it. A clone of the mounted volume likewise.

python3 tests/vm/runner.py --timeout 1200 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_snapshots.py
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RPC_TIMEOUT_S, SERVER, MiB, Volume, VolumeFactory

from zerofs_csi.csi import csi_pb2

pytestmark = pytest.mark.privileged

SIZE = 128 * MiB
# ext4's superblock (fs/ext4/ext4.h): at byte 1024 of the device, s_feature_incompat at
# offset 0x60 of it; INCOMPAT_RECOVER is set while the journal needs replaying.
EXT4_SUPERBLOCK = 1024
EXT4_FEATURE_INCOMPAT = 0x60
EXT4_FEATURE_INCOMPAT_RECOVER = 0x0004


def ext4_needs_recovery(image: Path) -> bool:
    with image.open("rb") as f:
        f.seek(EXT4_SUPERBLOCK + EXT4_FEATURE_INCOMPAT)
        incompat = int.from_bytes(f.read(4), "little")
    return bool(incompat & EXT4_FEATURE_INCOMPAT_RECOVER)


def write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def created_from(
    source: Volume, name: str, content: csi_pb2.VolumeContentSource, size: int
) -> Volume:
    """A volume made from ``content``, known to the plugin's clean-up like any other."""
    reply = source.plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[source.capability],
            parameters={**source.plugin.storage_parameters(), "filesystem": "ext4"},
            volume_content_source=content,
            secrets=source.plugin.secrets,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    volume = Volume(
        plugin=source.plugin,
        volume_id=reply.volume.volume_id,
        context=dict(reply.volume.volume_context),
        fs_type="ext4",
        staging=str(Path(source.staging).parent / reply.volume.volume_id),
        capability=source.capability,
    )
    source.plugin.volumes.append(volume)
    return volume


@contextlib.contextmanager
def snapshot_of(volume: Volume, name: str) -> Iterator[csi_pb2.Snapshot]:
    controller = volume.plugin.controller
    made = controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume.volume_id),
        timeout=RPC_TIMEOUT_S,
    ).snapshot
    try:
        yield made
    finally:
        with contextlib.suppress(grpc.RpcError):
            controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(
                    snapshot_id=made.snapshot_id, secrets=volume.plugin.secrets
                ),
                timeout=RPC_TIMEOUT_S,
            )


def test_a_snapshot_of_a_mounted_volume_restores_its_files_as_of_then(
    volumes: VolumeFactory,
) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    kept = os.urandom(3 * MiB)
    write_synced(target / "kept", kept)

    # Staged: no secrets in the call, the running server takes the checkpoint.
    with snapshot_of(volume, f"snap-{volume.volume_id}") as made:
        assert made.ready_to_use and made.size_bytes == SIZE
        write_synced(target / "kept", b"overwritten after the snapshot")
        write_synced(target / "later", b"written after the snapshot")

        content = csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=made.snapshot_id)
        )
        restored = created_from(volume, f"{volume.volume_id}-restored", content, 2 * SIZE)
        if not SERVER.real and volume.plugin.s3 is None:
            # The stand-in keeps a file:// export as a file, readable here.
            # The filesystem was frozen for the checkpoint: a clean ext4, no journal to
            # replay, while the mounted source's own export says it needs recovery.
            exports = volume.plugin.store
            restored_export = exports / restored.volume_id / ".nbd" / restored.volume_id
            assert not ext4_needs_recovery(restored_export)
            assert ext4_needs_recovery(exports / volume.volume_id / ".nbd" / volume.volume_id)
        restored.stage()
        restored_target = volume.plugin.workdir / "pods" / restored.volume_id
        restored.publish(str(restored_target))
        assert (restored_target / "kept").read_bytes() == kept
        assert not (restored_target / "later").exists()
        # The new volume's device is the size asked for, larger than the snapshot's.
        assert restored.record()["size_bytes"] == 2 * SIZE
        restored.cleanup()

        refused = volume.plugin.controller.DeleteVolume
        with pytest.raises(grpc.RpcError) as failed:
            refused(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_clone_of_a_mounted_volume_holds_its_files(volumes: VolumeFactory) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id
    volume.publish(str(target))
    data = os.urandom(2 * MiB)
    write_synced(target / "data", data)

    content = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id)
    )
    clone = created_from(volume, f"{volume.volume_id}-clone", content, SIZE)
    clone.stage()
    clone_target = volume.plugin.workdir / "pods" / clone.volume_id
    clone.publish(str(clone_target))
    assert (clone_target / "data").read_bytes() == data
    write_synced(clone_target / "data", b"the clone is a volume of its own")
    assert (target / "data").read_bytes() == data
