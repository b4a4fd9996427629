"""A volume's server dies with writes it acknowledged and never flushed.

ZeroFS answers an NBD write once the data is in its memory and makes it durable at the
next flush (a client's, or its own every ``flushIntervalSecs``); a kill -9 in between
loses the write. The kernel, reconnected to the restarted server, sends the flush that
was in flight (or the next one) to the new server, which has nothing to flush and
answers it: an fsync would report durable a write that is gone. The node does not let
that happen: it connects a device to a later server only when the one before shut down
gracefully, or the volume has ``syncWrites`` (every write durable when answered), and
otherwise disconnects it, so that its I/O fails.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_server_crash_durability.py
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal

import grpc
import pytest
from conftest import MiB, Volume, VolumeFactory, assert_code, wait_until

from zerofs_csi.servers.local import nbd_server_answers

pytestmark = pytest.mark.privileged

WRITE_BYTES = 4 * MiB


def pattern(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest() * (WRITE_BYTES // 32)


def aligned(data: bytes) -> mmap.mmap:
    """O_DIRECT needs a page-aligned buffer."""
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    return buffer


def write_direct(path: str, data: bytes, flush: bool) -> None:
    """Written past the page cache: answered by the server, and flushed if ``flush``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o644)
    try:
        assert os.pwritev(fd, [aligned(data)], 0) == len(data)
        if flush:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buffer = mmap.mmap(-1, WRITE_BYTES)
        assert os.preadv(fd, [buffer], 0) == WRITE_BYTES
        return bytes(buffer)
    finally:
        os.close(fd)


def kill_and_wait_for_the_next_server(volume: Volume) -> None:
    first_pid = volume.server_pid()
    assert first_pid is not None, volume.server_processes()
    os.killpg(first_pid, signal.SIGKILL)
    wait_until(
        lambda: (pid := volume.server_pid()) not in (None, first_pid) and pid, 60, "a restart"
    )
    nbd_socket = volume.plugin.state_dir / "sockets" / volume.volume_id / "nbd.sock"
    wait_until(lambda: nbd_server_answers(nbd_socket, 1.0), 120, "the new server to answer")


def fsync(path: str) -> OSError | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


@pytest.mark.parametrize("fs_type", ["block", "ext4"])
def test_a_crash_with_unflushed_writes_fails_the_device_instead_of_hiding_the_loss(
    volumes: VolumeFactory, fs_type: str
) -> None:
    volume = volumes(block=True, size=64 * MiB) if fs_type == "block" else volumes(size=64 * MiB)
    volume.stage()

    def path(name: str) -> str:
        return volume.device() if fs_type == "block" else f"{volume.staging}/mount/{name}"

    write_direct(path("flushed"), pattern("flushed"), flush=True)
    write_direct(path("unflushed"), pattern("unflushed"), flush=False)

    kill_and_wait_for_the_next_server(volume)
    # The device is disconnected rather than connected to the next server: the flush
    # fails (ZeroFS has lost the unflushed write; the stand-in keeps its writes, but the
    # node cannot tell the two apart).
    failed = wait_until(lambda: fsync(path("unflushed")), 60, "the device's I/O to fail")
    assert failed.errno == errno.EIO, failed
    condition = volume.stats(volume.staging).volume_condition
    assert condition.abnormal
    assert "killed by SIGKILL" in condition.message and "syncWrites" in condition.message
    log = volume.plugin.log_path.read_text(errors="replace")
    assert "no lost write is reported durable" in log

    # While a pod uses it, a NodeStage (another pod's) is refused with the reason.
    target = volume.plugin.workdir / "pods" / volume.volume_id / "target"
    volume.publish(str(target))
    refused = assert_code(volume.stage, grpc.StatusCode.FAILED_PRECONDITION)
    assert "killed by SIGKILL" in refused
    volume.unpublish(str(target))
    # Used by none, it is staged anew (torn down over a device that fails its I/O): it
    # serves what the server flushed, the filesystem's journal replayed.
    volume.stage()
    assert not volume.stats(volume.staging).volume_condition.abnormal
    if fs_type == "block":
        assert read_direct(path("")) in (pattern("flushed"), pattern("unflushed"))
    else:
        assert read_direct(path("flushed")) == pattern("flushed")
    volume.unstage()


def test_a_crash_of_a_server_with_sync_writes_is_a_pause(volumes: VolumeFactory) -> None:
    volume = volumes(block=True, size=64 * MiB, parameters={"syncWrites": "true"})
    volume.stage()
    device = volume.device()
    write_direct(device, pattern("flushed"), flush=True)
    write_direct(device, pattern("answered"), flush=False)  # durable when answered

    kill_and_wait_for_the_next_server(volume)
    assert fsync(device) is None
    assert read_direct(device) == pattern("answered")
    wait_until(
        lambda: not volume.stats(volume.staging).volume_condition.abnormal, 60, "reconnected"
    )
    volume.unstage()
