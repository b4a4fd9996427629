"""The test cluster's node disk (tools/cluster/node_disk.sh) on a real block device: kept
between runs only when the run that used it released it; made anew otherwise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

NODE_DISK = Path(__file__).resolve().parents[2] / "tools" / "cluster" / "node_disk.sh"
DISK_BYTES = 64 << 20
KEPT = "images/kept"


def node_disk(action: str, device: str, mountpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NODE_DISK), action, device, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def mount(device: str, mountpoint: Path) -> None:
    result = node_disk("mount", device, mountpoint)
    assert result.returncode == 0, result.stderr


def used_by_a_run(device: str, mountpoint: Path) -> None:
    """What a run leaves: its images on the disk."""
    mount(device, mountpoint)
    (mountpoint / KEPT).parent.mkdir(exist_ok=True)
    (mountpoint / KEPT).write_bytes(b"layer" * 1000)


def released(device: str, mountpoint: Path) -> None:
    used_by_a_run(device, mountpoint)
    result = node_disk("release", device, mountpoint)
    assert result.returncode == 0, result.stderr


def cut_off(device: str, mountpoint: Path) -> None:
    """The run's VM killed: the disk never released (unmounted here only so that the
    next run on this host can mount it)."""
    used_by_a_run(device, mountpoint)
    subprocess.run(["umount", str(mountpoint)], check=True, timeout=60)


def released_while_busy(device: str, mountpoint: Path) -> None:
    used_by_a_run(device, mountpoint)
    holder = subprocess.Popen(["sleep", "60"], cwd=mountpoint)
    try:
        result = node_disk("release", device, mountpoint)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert "still in use" in result.stderr


def never_formatted(device: str, mountpoint: Path) -> None:
    pass


def garbage(device: str, mountpoint: Path) -> None:
    with open(device, "r+b") as disk:
        disk.write(b"\xa5" * (4 << 20))


CASES = [
    # (the disk's past, its images kept by the next run)
    pytest.param(released, True, id="released"),
    pytest.param(cut_off, False, id="cut-off"),
    pytest.param(released_while_busy, False, id="released-while-busy"),
    pytest.param(never_formatted, False, id="blank"),
    pytest.param(garbage, False, id="garbage"),
]


@pytest.mark.parametrize(("past", "kept"), CASES)
def test_the_next_run_keeps_only_a_released_disk(
    loop_device: Callable[[int], tuple[str, Path]],
    tmp_path: Path,
    past: Callable[[str, Path], None],
    kept: bool,
) -> None:
    device, _ = loop_device(DISK_BYTES)
    mountpoint = tmp_path / "containerd"
    mountpoint.mkdir()
    past(device, mountpoint)

    result = node_disk("mount", device, mountpoint)
    try:
        assert result.returncode == 0, result.stderr
        assert (mountpoint / KEPT).exists() is kept
        assert ("made anew" in result.stderr) is (past in (cut_off, released_while_busy))
        assert not (mountpoint / "zerofs-node-released").exists()
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=60)
