"""Discards and zeroouts of a staged device against the server's largest request.

ZeroFS 2.3 answers a request over 128 MiB (TRIM and WRITE_ZEROES included) with EINVAL,
which the kernel turns into an I/O error; the kernel itself would send a discard of up to
4 GiB in one request to an NBD device.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest
from conftest import SERVER, MiB, VolumeFactory

pytestmark = pytest.mark.privileged

# <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127), both taking {u64 start, u64 length}.
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
SERVER_MAX_REQUEST = 128 * MiB


def queue_limit(device: str, name: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/queue/{name}").read_text())


def test_discard_and_zeroout_of_the_whole_device(volumes: VolumeFactory) -> None:
    """Each is split by the queue's limits into requests the server takes: neither fails,
    and the zeroed range reads back as zeroes."""
    # Over the server's largest request, and small: the zeroout writes every byte of it
    # into the stand-in's export, in the microVM's memory.
    size = SERVER_MAX_REQUEST + 64 * MiB
    volume = volumes(block=True, size=size)
    volume.stage()
    device = volume.device()
    print(
        f"{SERVER.describe()}: {device} discard_max_bytes "
        f"{queue_limit(device, 'discard_max_bytes')}, write_zeroes_max_bytes "
        f"{queue_limit(device, 'write_zeroes_max_bytes')}"
    )
    payload = os.urandom(1 * MiB)
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, payload, 150 * MiB)
        os.fsync(fd)
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 0, size))
        os.pwrite(fd, payload, 150 * MiB)
        os.fsync(fd)
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", 0, size))
        os.fsync(fd)
        assert os.pread(fd, len(payload), 150 * MiB) == bytes(len(payload))
    finally:
        os.close(fd)
    assert queue_limit(device, "discard_max_bytes") <= SERVER_MAX_REQUEST
