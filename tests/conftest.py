"""Shared test configuration: the ``privileged`` marker skips where NBD cannot be used."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zerofs_csi.bench.zerofs_server import ServerNotFound, zerofs_server


def nbd_unavailable_reason() -> str | None:
    """Why the kernel NBD path cannot be exercised here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) for NBD"
    try:
        fd = os.open("/dev/nbd0", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return (
            f"/dev/nbd0 cannot be opened ({exc.strerror}): no kernel NBD here; run `make test-vm`"
        )
    os.close(fd)
    return None


def pytest_report_header(config: pytest.Config) -> str:
    """Which per-volume server the tests that start one run."""
    try:
        return f"per-volume server: {zerofs_server().describe()}"
    except ServerNotFound as exc:
        return f"per-volume server: none: {exc}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = nbd_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


def _losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], tuple[str, Path]]]:
    """Factory for real block devices: a sparse image attached to a loop device.

    Returns (device path, image path). Skips where loop devices cannot be used.
    """
    attached: list[str] = []

    def make(size_bytes: int) -> tuple[str, Path]:
        image = tmp_path / f"disk{len(attached)}.img"
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        try:
            device = _losetup("--find", "--show", str(image))
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"no usable loop device here: {exc}")
        attached.append(device)
        return device, image

    yield make
    for device in attached:
        subprocess.run(["umount", "-A", device], capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
