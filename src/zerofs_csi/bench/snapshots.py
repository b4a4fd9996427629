"""Benchmark: a snapshot and a restore, per GiB of the volume's data, against a plain
copy of the same data from device to device in the same run.

One plugin (``--role all``, local backend, the run's server), a raw block volume staged
with ``DATA_MIB`` MiB of random data written through its device. Each cycle, timed
apart:

- snapshot: CreateSnapshot of the staged volume (its server flushes and checkpoints);
- restore: CreateVolume from that snapshot, which starts two short-lived servers (the
  checkpoint's, read-only, and the new volume's) and copies the one export into the
  other, skipping what reads as zeroes; the new volume and the snapshot are deleted
  after (untimed);
- the baseline: the same ``DATA_MIB`` MiB read from the volume's device and written to
  the device of a new volume staged beside it, in ``COPY_CHUNK`` requests with direct
  I/O, then an fsync: what a restore would cost through the kernel's devices alone
  (the new volume's stage, unstage and deletion are not timed).

Each time is in seconds per GiB of data; the ratios say what a snapshot and a restore
cost against a copy.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

from zerofs_csi.bench.measure import Benchmark, Comparison, RunOptions
from zerofs_csi.bench.plugin import (
    RPC_TIMEOUT_S,
    PluginProcess,
    Volume,
    block_capability,
    create_volume,
    running_plugin,
)
from zerofs_csi.csi import csi_pb2

MiB = 1 << 20
GiB = 1 << 30
DATA_MIB = 256
VOLUME_SIZE = 512 * MiB
COPY_CHUNK = 4 * MiB


def _aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory, as O_DIRECT needs."""
    return mmap.mmap(-1, size)


def write_random(device: str, mib: int) -> None:
    buffer = _aligned_buffer(COPY_CHUNK)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for offset in range(0, mib * MiB, COPY_CHUNK):
            buffer[:] = os.urandom(COPY_CHUNK)
            os.pwrite(fd, buffer, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def copy_device(source: str, target: str, mib: int) -> None:
    buffer = _aligned_buffer(COPY_CHUNK)
    reader = os.open(source, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    writer = os.open(target, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for offset in range(0, mib * MiB, COPY_CHUNK):
            os.preadv(reader, [buffer], offset)
            os.pwrite(writer, buffer, offset)
        os.fsync(writer)
    finally:
        os.close(reader)
        os.close(writer)
        buffer.close()


def _per_gib(seconds: float, mib: int) -> float:
    return seconds * GiB / (mib * MiB)


def _restore(source: Volume, snapshot_id: str, name: str) -> str:
    plugin = source.plugin
    reply = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=VOLUME_SIZE),
            volume_capabilities=[block_capability()],
            parameters=plugin.storage_parameters(),
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
            ),
            secrets=plugin.secrets,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    return str(reply.volume.volume_id)


def bench_snapshot(run: RunOptions, data_mib: int = DATA_MIB) -> list[Comparison]:
    snapshots: list[float] = []
    restores: list[float] = []
    copies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="zerofs-bench-snap-") as tmp:
        workdir = Path(tmp)
        plugin = PluginProcess(
            workdir, zerofs_command=run.zerofs_command, s3=run.s3, log_level="warning"
        )
        with running_plugin(plugin):
            source = create_volume(
                plugin, workdir, size=VOLUME_SIZE, block=True, name="bench-snapshot-source"
            )
            source.stage()
            write_random(source.device(), data_mib)
            for cycle in range(run.warmup + run.cycles):
                started = time.perf_counter()
                made = plugin.controller.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(
                        source_volume_id=source.volume_id,
                        name=f"bench-snapshot-{cycle}",
                        secrets=plugin.secrets,
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                snapshotted = time.perf_counter()
                restored_id = _restore(source, made.snapshot.snapshot_id, f"bench-restore-{cycle}")
                restored = time.perf_counter()
                plugin.controller.DeleteVolume(
                    csi_pb2.DeleteVolumeRequest(volume_id=restored_id, secrets=plugin.secrets),
                    timeout=RPC_TIMEOUT_S,
                )
                plugin.controller.DeleteSnapshot(
                    csi_pb2.DeleteSnapshotRequest(
                        snapshot_id=made.snapshot.snapshot_id, secrets=plugin.secrets
                    ),
                    timeout=RPC_TIMEOUT_S,
                )

                target = create_volume(
                    plugin, workdir, size=VOLUME_SIZE, block=True, name=f"bench-copy-{cycle}"
                )
                target.stage()
                copy_started = time.perf_counter()
                copy_device(source.device(), target.device(), data_mib)
                copied = time.perf_counter()
                target.unstage()
                target.delete()
                plugin.volumes.remove(target)
                if cycle >= run.warmup:
                    snapshots.append(_per_gib(snapshotted - started, data_mib))
                    restores.append(_per_gib(restored - snapshotted, data_mib))
                    copies.append(_per_gib(copied - copy_started, data_mib))
    return [
        Comparison("snapshot_per_gib", "s/GiB", snapshots, "device copy", copies),
        Comparison("restore_per_gib", "s/GiB", restores, "device copy", copies),
    ]


BENCHMARKS: dict[str, Benchmark] = {"snapshot": bench_snapshot}
