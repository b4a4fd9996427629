"""The attach path against the real kernel NBD driver and a real nbdkit (run in the VM).

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -q tests/privileged/test_nbd_attach.py
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import KernelLog

from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.nbd.index_choice import COOLDOWN_S

pytestmark = pytest.mark.privileged

MiB = 1 << 20


class NbdkitServer:
    """nbdkit's file plugin serving every file of a directory as an export of that name;
    the files survive a restart of the server."""

    def __init__(self, directory: Path, sock: str, *extra: str, params: tuple[str, ...] = ()):
        self.dir = directory
        self.sock = sock
        self.extra = extra
        self.params = params
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def add_export(self, name: str, size: int) -> str:
        with open(self.dir / name, "wb") as f:
            f.truncate(size)
        return name

    def start(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", self.sock, *self.extra, "file", f"dir={self.dir}", *self.params],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.sock)
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., NbdkitServer]]:
    servers: list[NbdkitServer] = []

    def make(*extra: str, params: tuple[str, ...] = ()) -> NbdkitServer:
        directory = tmp_path / f"exports{len(servers)}"
        directory.mkdir()
        server = NbdkitServer(
            directory, str(tmp_path / f"nbd{len(servers)}.sock"), *extra, params=params
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., NbdkitServer]) -> NbdkitServer:
    return server_factory()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}-"


def _cleanup(attacher: nbd.NbdAttacher, prefix: str) -> None:
    for info in attacher.devices():
        if info.backend_id and info.backend_id.startswith(prefix):
            attacher.detach(info.index, info.backend_id)


@pytest.fixture
def attacher(prefix: str) -> Iterator[nbd.NbdAttacher]:
    instance = nbd.NbdAttacher()
    yield instance
    _cleanup(instance, prefix)
    instance.close()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def connected(index: int) -> bool:
    return _nbd.read_sysfs(index, "pid") is not None


def wait_released(index: int) -> None:
    """The kernel drops pid and backend once the last opener (udev's probe of the
    teardown event, typically) closes a disconnected device."""
    deadline = time.monotonic() + 30
    while connected(index) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not connected(index)


# ---- attach, read back, detach -------------------------------------------------------


def test_attach_returns_a_ready_device_of_the_export_size(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 24 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "a", connections=1)
    assert device.size_bytes == 24 * MiB
    assert device.path == f"/dev/nbd{device.index}"
    assert stat.S_ISBLK(os.stat(device.path).st_mode)
    assert _nbd.block_device_size(device.path) == 24 * MiB
    assert _nbd.read_sysfs(device.index, "backend") == prefix + "a"
    assert int(_nbd.read_sysfs(device.index, "size") or 0) * 512 == 24 * MiB
    assert attacher.find_device(prefix + "a") == device


def test_write_then_read_back_through_a_second_attach(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 16 * MiB)
    data = pattern(1, 3 * MiB)
    first = attacher.attach(server.sock, "vol", prefix + "w", connections=1)
    write_at(first.path, 5 * MiB, data)
    attacher.detach(first.index, prefix + "w")
    second = attacher.attach(server.sock, "vol", prefix + "r", connections=1)
    assert read_at(second.path, 5 * MiB, len(data)) == data


@pytest.mark.parametrize("use_ioctl", [False, True], ids=["netlink", "ioctl"])
def test_a_read_only_attach_is_read_only_whatever_the_server_offers(
    server: NbdkitServer, prefix: str, use_ioctl: bool
) -> None:
    """nbdkit serves the export writable (no READ_ONLY flag, as ZeroFS 2.3 serving a
    checkpoint): the kernel makes the device read-only all the same, and no write
    reaches the server."""
    server.add_export("vol", 8 * MiB)
    data = pattern(3, MiB)
    with open(server.dir / "vol", "r+b") as export:
        export.write(data)
    attacher = nbd.NbdAttacher(use_ioctl=use_ioctl)
    device = attacher.attach(server.sock, "vol", prefix + "ro", connections=1, read_only=True)
    try:
        assert _nbd.read_sysfs(device.index, "ro") == "1"
        # No flushes either: ZeroFS's read-only servers fail them (EIO).
        assert _nbd.read_sysfs(device.index, "queue/write_cache") == "write through"
        with pytest.raises(OSError) as refused:
            write_at(device.path, 0, pattern(4, MiB))
        assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
        assert read_at(device.path, 0, MiB) == data
    finally:
        attacher.detach(device.index, prefix + "ro")
        attacher.close()
    assert (server.dir / "vol").read_bytes()[:MiB] == data


def test_detach_leaves_nothing_connected(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 8 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "d", connections=1)
    assert connected(device.index)
    attacher.detach(device.index, prefix + "d")
    assert attacher.find_device(prefix + "d") is None
    assert all(info.backend_id != prefix + "d" for info in attacher.devices())
    wait_released(device.index)
    assert _nbd.read_sysfs(device.index, "backend") is None
    assert all(info.backend_id != prefix + "d" for info in nbd.NbdAttacher().devices())
    attacher.detach(device.index, prefix + "d")  # detaching again is a no-op


def test_detach_refuses_a_device_of_another_backend(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 8 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "mine", connections=1)
    with pytest.raises(nbd.NotOwner) as info:
        attacher.detach(device.index, prefix + "someone-else")
    assert info.value.errno == errno.EPERM
    assert connected(device.index)
    assert _nbd.read_sysfs(device.index, "backend") == prefix + "mine"


# ---- concurrency and idempotency -----------------------------------------------------


def test_32_concurrent_attaches_get_distinct_devices(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    names = [server.add_export(f"vol{i}", 4 * MiB) for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        devices = list(
            # 32 udev probes at once on two emulated CPUs can hold the disks a while.
            pool.map(
                lambda n: attacher.attach(
                    server.sock, n, prefix + n, connections=1, ready_timeout_s=120
                ),
                names,
            )
        )
    assert len({d.index for d in devices}) == 32
    for name, device in zip(names, devices, strict=True):
        assert _nbd.read_sysfs(device.index, "backend") == prefix + name
        assert _nbd.block_device_size(device.path) == 4 * MiB
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda d: attacher.detach(d.index, d.backend_id), devices))
    assert all(attacher.find_device(d.backend_id) is None for d in devices)
    for device in devices:
        wait_released(device.index)


def test_same_backend_twice_never_makes_two_devices(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    backend = prefix + "same"
    with ThreadPoolExecutor(max_workers=8) as pool:
        devices = list(
            pool.map(
                lambda _: attacher.attach(server.sock, "vol", backend, connections=1), range(8)
            )
        )
    assert len({d.index for d in devices}) == 1
    again = attacher.attach(server.sock, "vol", backend, connections=1)
    assert again.index == devices[0].index
    # A second attacher object (another process would look the same) finds it too.
    other = nbd.NbdAttacher()
    assert other.attach(server.sock, "vol", backend, connections=1).index == again.index
    other.close()
    assert [i.index for i in attacher.devices() if i.backend_id == backend] == [again.index]


def test_explicit_busy_index_is_device_busy(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    server.add_export("vol2", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "x", connections=1)
    with pytest.raises(nbd.DeviceBusy) as info:
        attacher.attach(server.sock, "vol2", prefix + "y", connections=1, index=device.index)
    assert info.value.errno == errno.EBUSY


# ---- multiple connections ------------------------------------------------------------


def test_four_connections_when_the_server_allows_multi_conn(
    attacher: nbd.NbdAttacher,
    server_factory: Callable[..., NbdkitServer],
    prefix: str,
    tmp_path: Path,
) -> None:
    log = tmp_path / "mc.log"
    server = server_factory("--filter=log", params=(f"logfile={log}",))
    server.add_export("vol", 16 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "mc", connections=4)
    assert log.read_text().count(" Connect ") == 4  # the server saw four connections
    data = pattern(4, 4 * MiB)
    write_at(device.path, 0, data)
    attacher.detach(device.index, prefix + "mc")
    again = attacher.attach(server.sock, "vol", prefix + "mc2", connections=4)
    assert read_at(again.path, 0, len(data)) == data


def hardware_queues(index: int) -> int:
    return len([e for e in os.listdir(f"/sys/block/nbd{index}/mq") if e.isdigit()])


def test_attach_prefers_a_device_that_has_as_many_hardware_queues(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    # One device left with four hardware queues, the next one in rotation with one.
    kept = attacher.attach(server.sock, "vol", prefix + "kept", connections=4)
    rotated = attacher.attach(server.sock, "vol", prefix + "rot", connections=1)
    for device, backend in ((kept, "kept"), (rotated, "rot")):
        attacher.detach(device.index, prefix + backend)
        wait_released(device.index)
    four = nbd.hardware_queues_for(4)
    assert four > 1, "needs a machine with at least two CPUs"
    assert (hardware_queues(kept.index), hardware_queues(rotated.index)) == (four, 1)
    time.sleep(COOLDOWN_S + 0.1)  # both out of their post-detach cooldown

    again = attacher.attach(server.sock, "vol", prefix + "again", connections=4)

    # Rotation alone would take the device after `rotated`, which has one queue.
    assert again.index == kept.index


def test_several_connections_refused_without_multi_conn(
    attacher: nbd.NbdAttacher, server_factory: Callable[..., NbdkitServer], prefix: str
) -> None:
    server = server_factory("--filter=multi-conn", params=("multi-conn-mode=disable",))
    server.add_export("vol", 4 * MiB)
    with pytest.raises(nbd.MultiConnUnsupported) as info:
        attacher.attach(server.sock, "vol", prefix + "nomc", connections=4)
    assert info.value.errno == errno.EINVAL
    assert "CAN_MULTI_CONN" in str(info.value)
    assert attacher.find_device(prefix + "nomc") is None
    # The kernel refuses it too when asked directly.
    with _nbd.negotiate(server.sock, "vol", 2) as neg, _nbd.NbdNetlink() as nl:
        with pytest.raises(nbd.NetlinkError) as kernel:
            nl.connect(neg.socket_fds, neg.size_bytes, server_flags=neg.transmission_flags)
        assert kernel.value.errno == errno.EINVAL
    device = attacher.attach(server.sock, "vol", prefix + "nomc", connections=1)
    assert _nbd.block_device_size(device.path) == 4 * MiB


# ---- errors --------------------------------------------------------------------------


def test_unknown_export_creates_no_device(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    with pytest.raises(nbd.ExportNotFound):
        attacher.attach(server.sock, "missing", prefix + "m", connections=1)
    assert attacher.find_device(prefix + "m") is None


def test_without_cap_sys_admin_connect_is_a_permission_error(server: NbdkitServer) -> None:
    code = (
        "import socket, sys\n"
        "from zerofs_csi.nbd import _nbd\n"
        "a, b = socket.socketpair()\n"
        "try:\n"
        "    _nbd.NbdNetlink().connect([a.fileno()], 1 << 20)\n"
        "except _nbd.NbdPermissionError as exc:\n"
        "    print(exc.errno, exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{errno.EPERM} ")
    assert "CAP_SYS_ADMIN" in result.stdout


# ---- readiness -----------------------------------------------------------------------


def test_ready_waits_for_a_probe_holding_the_disk(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "lock", connections=1)
    # Stand in for udev's worker: a shared lock on the whole disk while "probing".
    prober = os.open(device.path, os.O_RDONLY)
    fcntl.flock(prober, fcntl.LOCK_SH)
    with pytest.raises(nbd.DeviceNotReady) as info:
        _nbd.wait_ready(device.index, device.size_bytes, 0.3)
    assert info.value.errno == errno.ETIMEDOUT
    threading.Timer(0.5, os.close, (prober,)).start()
    started = time.monotonic()
    # Returns (instead of timing out) once the holder closes; udev's own probe of the
    # connect event may hold the lock a little longer.
    _nbd.wait_ready(device.index, device.size_bytes, 30.0)
    assert time.monotonic() - started >= 0.4


def test_keep_lock_holds_off_udev(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "hold", connections=1, keep_lock=True)
    assert device.lock is not None and device.lock.held
    probe = os.open(device.path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        device.lock.release()
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(probe)


def probe_like_udev(path: str, locked: threading.Event, failures: list[OSError]) -> None:
    """Stand in for udev's worker probing the device: the shared lock on the whole disk,
    then reads across it for about a second."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        locked.set()
        for offset in range(0, 16 * MiB, 64 * 1024):
            os.pread(fd, 64 * 1024, offset)
            time.sleep(0.004)
    except OSError as exc:
        failures.append(exc)
    finally:
        os.close(fd)


def test_detach_waits_for_a_probe_holding_the_disk(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str, kernel_log: KernelLog
) -> None:
    server.add_export("vol", 16 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "probed", connections=1)
    locked, failures = threading.Event(), []
    prober = threading.Thread(target=probe_like_udev, args=(device.path, locked, failures))
    prober.start()
    assert locked.wait(10)
    attacher.detach(device.index, prefix + "probed")
    prober.join(30)
    assert not failures, "the probe's reads failed: the disconnect came in the middle"
    time.sleep(0.3)  # the kernel log is read on a thread of its own
    assert not [line for line in kernel_log.forbidden if f"nbd{device.index}" in line]
    wait_released(device.index)


def test_detach_waits_for_a_probe_no_longer_than_its_bound(
    attacher: nbd.NbdAttacher,
    server: NbdkitServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nbd, "DISCONNECT_LOCK_TIMEOUT_S", 0.5)
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "stuck", connections=1)
    # A probe that never ends (a hung udev worker) holds the shared lock throughout.
    holder = os.open(device.path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        started = time.monotonic()
        attacher.detach(device.index, prefix + "stuck")
        assert 0.4 <= time.monotonic() - started < 5
        assert attacher.find_device(prefix + "stuck") is None
    finally:
        os.close(holder)
    wait_released(device.index)


def test_ready_creates_a_missing_device_node(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str, tmp_path: Path
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "node", connections=1)
    # A /dev that is not devtmpfs (a container's): a plain tmpfs that allows nodes.
    dev_dir = tmp_path / "dev"
    dev_dir.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "dev,mode=755", "tmpfs", str(dev_dir)], check=True
    )
    try:
        _nbd.wait_ready(device.index, device.size_bytes, 10.0, dev_dir=str(dev_dir))
        node = os.stat(dev_dir / f"nbd{device.index}")
        assert stat.S_ISBLK(node.st_mode)
        assert node.st_rdev == os.stat(device.path).st_rdev
    finally:
        subprocess.run(["umount", str(dev_dir)], check=True)


def test_ready_reports_a_size_mismatch(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "size", connections=1)
    with pytest.raises(nbd.DeviceNotReady) as info:
        _nbd.wait_ready(device.index, 8 * MiB, 1.0)
    assert info.value.errno == errno.EIO


def test_resize_grows_the_device(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "grow", connections=1)
    os.truncate(server.dir / "vol", 8 * MiB)
    attacher.resize(device.index, prefix + "grow", 8 * MiB)
    assert _nbd.block_device_size(device.path) == 8 * MiB
    with pytest.raises(nbd.NotOwner):
        attacher.resize(device.index, prefix + "other", 16 * MiB)


# ---- dead links and reconnect --------------------------------------------------------


CHUNK = 2 * MiB
CHUNKS = 12


def run_writer(
    path: str,
    durable: list[int],
    errors: list[OSError],
    progress: threading.Event,
) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(CHUNKS):
            os.pwrite(fd, pattern(100 + i, CHUNK), i * CHUNK)
            os.fsync(fd)
            durable.append(i)
            if i == 2:
                progress.set()
    except OSError as exc:
        errors.append(exc)
    finally:
        progress.set()
        os.close(fd)


def test_link_dead_then_reconnect_lets_a_writer_finish(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", CHUNKS * CHUNK)
    backend = prefix + "rc"
    device = attacher.attach(
        server.sock, "vol", backend, connections=1, io_timeout_s=5, dead_conn_timeout_s=60
    )
    with attacher.link_dead_listener() as listener:
        durable: list[int] = []
        errors: list[OSError] = []
        progress = threading.Event()
        writer = threading.Thread(target=run_writer, args=(device.path, durable, errors, progress))
        writer.start()
        assert progress.wait(120)
        server.kill()
        server.start()
        events: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            events = listener.receive(1.0)
        assert (device.index, backend) in events
        attacher.reconnect(device.index, backend, server.sock, "vol")
        writer.join(180)
        assert not writer.is_alive()
    assert errors == []
    assert durable == list(range(CHUNKS))
    attacher.detach(device.index, backend)
    check = attacher.attach(server.sock, "vol", prefix + "check", connections=1)
    for i in range(CHUNKS):
        assert read_at(check.path, i * CHUNK, CHUNK) == pattern(100 + i, CHUNK), f"chunk {i}"


def test_without_reconnect_the_writer_gets_eio(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", CHUNKS * CHUNK)
    backend = prefix + "norc"
    device = attacher.attach(
        server.sock, "vol", backend, connections=1, io_timeout_s=2, dead_conn_timeout_s=3
    )
    durable: list[int] = []
    errors: list[OSError] = []
    progress = threading.Event()
    writer = threading.Thread(target=run_writer, args=(device.path, durable, errors, progress))
    writer.start()
    assert progress.wait(120)
    server.kill()
    server.start()  # the server is back, but nobody reconfigures the device
    writer.join(120)
    assert not writer.is_alive()
    assert errors and errors[0].errno == errno.EIO
    assert len(durable) < CHUNKS


def test_reconnect_refuses_another_backend(
    attacher: nbd.NbdAttacher, server: NbdkitServer, prefix: str
) -> None:
    server.add_export("vol", 4 * MiB)
    device = attacher.attach(server.sock, "vol", prefix + "own", connections=1)
    with pytest.raises(nbd.NotOwner):
        attacher.reconnect(device.index, prefix + "not-own", server.sock, "vol")


# ---- ioctl fallback ------------------------------------------------------------------


def test_ioctl_attach_write_detach(server: NbdkitServer, prefix: str) -> None:
    server.add_export("vol", 8 * MiB)
    legacy = nbd.NbdAttacher(use_ioctl=True)
    device = legacy.attach(server.sock, "vol", prefix + "io", connections=1)
    try:
        assert _nbd.block_device_size(device.path) == 8 * MiB
        assert _nbd.read_sysfs(device.index, "backend") is None  # no backend via ioctl
        assert legacy.find_device(prefix + "io") == device
        data = pattern(7, MiB)
        write_at(device.path, MiB, data)
        with pytest.raises(nbd.NotOwner):
            legacy.detach(device.index, prefix + "other")
    finally:
        legacy.detach(device.index, prefix + "io")
    assert legacy.find_device(prefix + "io") is None
    wait_released(device.index)
    netlinked = nbd.NbdAttacher()
    try:
        again = netlinked.attach(server.sock, "vol", prefix + "io2", connections=1)
        assert read_at(again.path, MiB, MiB) == data
    finally:
        _cleanup(netlinked, prefix)
        netlinked.close()
