"""End-to-end proof of the privileged test environment (the microVM or a privileged host).

A real nbdkit memory export is attached through the kernel's NBD driver with
nbd-client, formatted, mounted, written, remounted and read back, then detached.
Run in the VM with:

    python3 tests/vm/runner.py -- \
        .venv/bin/pytest -m privileged tests/privileged/test_vm_runner.py -v
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zerofs_csi.bench.plugin import wait_until

pytestmark = pytest.mark.privileged

EXPORT_SIZE = 256 * 1024 * 1024
SECTOR = 512  # /sys/block/*/size counts 512-byte sectors whatever the block size
CONTENT = b"zerofs-csi vm runner check\n" * 1000


def run(*argv: str) -> str:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed with status {completed.returncode}: "
            f"{completed.stderr.strip() or completed.stdout.strip()}"
        )
    return completed.stdout


def nbd_index(sys_block: Path) -> int:
    return int(sys_block.name.removeprefix("nbd"))


def free_nbd_device() -> Path:
    """The lowest /sys/block/nbdN without a `pid` file (no connection)."""
    candidates = sorted(Path("/sys/block").glob("nbd*"), key=nbd_index)
    for sys_block in candidates:
        if not (sys_block / "pid").exists():
            return sys_block
    raise AssertionError(f"all {len(candidates)} nbd devices are connected")


def in_test_vm() -> bool:
    return "zerofs_vm.run=" in Path("/proc/cmdline").read_text()


@pytest.fixture
def nbdkit_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket served by nbdkit's memory plugin, stopped after the test."""
    socket_path = tmp_path / "nbdkit.sock"
    server = subprocess.Popen(
        [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "--unix",
            str(socket_path),
            "memory",
            f"size={EXPORT_SIZE}",
        ]
    )
    try:
        wait_until(
            lambda: socket_path.exists() or server.poll() is not None, 30.0, "nbdkit's socket"
        )
        assert server.poll() is None, f"nbdkit exited with status {server.returncode}"
        yield socket_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def nbd_slot() -> Iterator[Path]:
    """A free /sys/block/nbdN, disconnected after the test if it is still connected."""
    sys_block = free_nbd_device()
    try:
        yield sys_block
    finally:
        if (sys_block / "pid").exists():
            subprocess.run(
                ["nbd-client", "-d", f"/dev/{sys_block.name}"], capture_output=True, check=False
            )


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory, unmounted after the test if something is still mounted there."""
    directory = tmp_path / "mnt"
    directory.mkdir()
    try:
        yield directory
    finally:
        while os.path.ismount(directory):
            subprocess.run(["umount", str(directory)], capture_output=True, check=False)


def test_nbdkit_export_attach_format_mount_detach(
    nbdkit_socket: Path, nbd_slot: Path, mountpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = f"/dev/{nbd_slot.name}"

    started = time.monotonic()
    run("nbd-client", "-unix", str(nbdkit_socket), device)
    attach_seconds = time.monotonic() - started
    assert (nbd_slot / "pid").exists(), f"{device} has no pid file after nbd-client returned"
    size = int((nbd_slot / "size").read_text()) * SECTOR
    assert size == EXPORT_SIZE
    assert int(run("blockdev", "--getsize64", device)) == EXPORT_SIZE
    with capsys.disabled():
        print(
            f"\n    attached {device} to nbdkit (memory, unix socket): "
            f"{size} bytes in {attach_seconds:.2f} s"
        )

    run("mkfs.ext4", "-q", "-F", device)
    run("mount", "-t", "ext4", device, str(mountpoint))
    data_file = mountpoint / "data"
    fd = os.open(data_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, CONTENT)
        os.fsync(fd)
    finally:
        os.close(fd)
    run("umount", str(mountpoint))
    assert not os.path.ismount(mountpoint)

    # A fresh mount reads the file back from the export, not from the old mount.
    run("mount", "-t", "ext4", device, str(mountpoint))
    assert data_file.read_bytes() == CONTENT
    run("umount", str(mountpoint))

    started = time.monotonic()
    run("nbd-client", "-d", device)
    wait_until(lambda: not (nbd_slot / "pid").exists(), 10, f"{device}'s pid file to go")
    detach_seconds = time.monotonic() - started
    assert int((nbd_slot / "size").read_text()) == 0
    with capsys.disabled():
        print(f"    detached {device} in {detach_seconds:.2f} s")


def test_vm_guest_is_set_up_for_nbd_benchmarks() -> None:
    """The runner's guest: nbd parameters, filesystems, udev (only checked inside the VM)."""
    if not in_test_vm():
        pytest.skip("checks the microVM's own setup; this is a privileged host")
    parameters = Path("/sys/module/nbd/parameters")
    assert (parameters / "nbds_max").read_text().strip() == "128"
    assert (parameters / "max_part").read_text().strip() == "0"
    assert len(list(Path("/sys/block").glob("nbd*"))) == 128
    filesystems = Path("/proc/filesystems").read_text()
    for name in ("ext4", "xfs", "btrfs"):
        assert re.search(rf"\s{name}$", filesystems, re.MULTILINE), f"{name} is not registered"
    run("udevadm", "control", "--ping")
