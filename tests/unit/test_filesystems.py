"""Probing, making, mounting and growing real filesystems on real (loop) block devices."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from zerofs_csi.errors import Internal, InvalidArgument, OutOfRange
from zerofs_csi.host import filesystems, fsprobe, mount_options, mounts

MiB = 1 << 20
LoopFactory = Callable[[int], tuple[str, Path]]
CAP_SYS_RESOURCE = 24  # include/uapi/linux/capability.h


def has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


@pytest.mark.parametrize("fs", filesystems.SUPPORTED)
def test_mkfs_probe_mount_grow(fs: str, loop_device: LoopFactory, tmp_path: Path) -> None:
    device, image = loop_device(320 * MiB)
    assert fsprobe.probe(device).fresh
    filesystems.make_filesystem(fs, device)
    contents = fsprobe.probe(device)
    assert contents.fs_type == fs and not contents.fresh

    target = tmp_path / "mnt"
    target.mkdir()
    options = mount_options.MountOptions.parse(["noatime", "nodev,nosuid"])
    mounts.mount(device, target, fs, options.flags, options.data)
    try:
        entry = mounts.find_mount(target)
        assert entry is not None and entry.fstype == fs and entry.source == device
        assert {"noatime", "nodev", "nosuid"} <= set(entry.options)
        before = os.statvfs(target)
        if fs == "ext4" and not has_capability(CAP_SYS_RESOURCE):
            pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE, which this sandbox lacks")
        # Grow the backing file, tell the loop driver, grow the mounted filesystem.
        with open(image, "r+b") as f:
            f.truncate(640 * MiB)
        subprocess.run(["losetup", "-c", device], check=True, timeout=60)
        filesystems.grow_filesystem(fs, device, str(target))
        after = os.statvfs(target)
        assert after.f_blocks * after.f_frsize > 1.5 * before.f_blocks * before.f_frsize
    finally:
        assert mounts.unmount_all(target) == 1
    assert mounts.find_mount(target) is None


def test_bind_mount_read_only(loop_device: LoopFactory, tmp_path: Path) -> None:
    device, _ = loop_device(64 * MiB)
    filesystems.make_filesystem("ext4", device)
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    target.mkdir()
    mounts.mount(device, staging, "ext4")
    try:
        (staging / "f").write_text("data")
        mounts.bind_mount(staging, target, readonly=True)
        entry = mounts.find_mount(target)
        assert entry is not None and entry.readonly and entry.source == device
        assert (target / "f").read_text() == "data"
        with pytest.raises(OSError) as info:
            (target / "g").write_text("refused")
        assert info.value.errno == 30  # EROFS
        mounts.unmount_all(target)
    finally:
        mounts.unmount_all(target)
        mounts.unmount_all(staging)


@pytest.mark.parametrize(
    ("damage", "describes"),
    [
        (lambda f: (f.seek(4096), f.write(b"\x01")), "data of an unknown kind"),
        (lambda f: (f.seek(510), f.write(b"\x55\xaa")), "a dos partition table"),
    ],
)
def test_data_of_any_kind_is_not_fresh(
    damage: Callable[..., object], describes: str, tmp_path: Path
) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    with open(image, "r+b") as f:
        damage(f)
    contents = fsprobe.probe(str(image))
    assert not contents.fresh
    assert contents.describe() == describes


@pytest.mark.parametrize("made", filesystems.SUPPORTED)
@pytest.mark.parametrize("expect", [None, *filesystems.SUPPORTED, "no-such-type"])
def test_probe_with_an_expected_type_finds_what_is_there(
    made: str, expect: str | None, tmp_path: Path
) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    filesystems.make_filesystem(made, str(image))
    contents = fsprobe.probe(str(image), expect=expect)
    assert contents.fs_type == made
    assert not contents.fresh


@pytest.mark.parametrize("expect", [None, "ext4"])
def test_probe_with_an_expected_type_still_sees_data_and_blanks(
    expect: str | None, tmp_path: Path
) -> None:
    blank, damaged = tmp_path / "blank", tmp_path / "damaged"
    for image in (blank, damaged):
        with open(image, "wb") as f:
            f.truncate(8 * MiB)
    with open(damaged, "r+b") as f:
        f.seek(510)
        f.write(b"\x55\xaa")
    assert fsprobe.probe(str(blank), expect=expect).fresh
    contents = fsprobe.probe(str(damaged), expect=expect)
    assert not contents.fresh and contents.describe() == "a dos partition table"


def test_probe_missing_device_raises() -> None:
    with pytest.raises(OSError):
        fsprobe.probe("/dev/does-not-exist")


@pytest.mark.parametrize(
    ("words", "flags", "data"),
    [
        (["ro"], mount_options.MS_RDONLY, ""),
        (
            ["noatime,discard", "nodev"],
            mount_options.MS_NOATIME | mount_options.MS_NODEV,
            "discard",
        ),
        (["ro", "rw"], 0, ""),
        (["defaults", "data=ordered", "commit=30"], 0, "data=ordered,commit=30"),
        ([" noexec , lazytime "], mount_options.MS_NOEXEC | mount_options.MS_LAZYTIME, ""),
    ],
)
def test_mount_options_parse(words: list[str], flags: int, data: str) -> None:
    assert mount_options.MountOptions.parse(words) == mount_options.MountOptions(flags, data)


@pytest.mark.parametrize("word", ["bind", "remount", "rbind,ro", "loop"])
def test_mount_options_refuse_structural_words(word: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        mount_options.MountOptions.parse([word])


def test_parse_mountinfo_unescapes_paths() -> None:
    line = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root "
        "rw,errors=continue"
    )
    (entry,) = mounts.parse_mountinfo(line)
    assert entry.mountpoint == "/mnt/with space"
    assert entry.root == "/mnt1"
    assert entry.fstype == "ext3" and entry.source == "/dev/root"
    assert entry.options == ("rw", "noatime") and entry.major_minor == "98:0"


def test_unsupported_filesystem_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="ext4, xfs, btrfs"):
        filesystems.mkfs_argv("ntfs", "/dev/nbd0")


def test_mkfs_failure_reports_the_tool(tmp_path: Path) -> None:
    with pytest.raises(Internal, match="mkfs.ext4 on .* failed"):
        filesystems.make_filesystem("ext4", str(tmp_path / "missing-device"))


@contextmanager
def nbd_like_device(tmp_path: Path, size_bytes: int) -> Iterator[str]:
    """A sparse image on a loop device with 4096-byte sectors, as /dev/nbdX has."""
    image = tmp_path / f"sized-{size_bytes}.img"
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", str(image)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if attach.returncode != 0:
        pytest.skip(f"no usable loop device here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
        image.unlink()


def _makes_a_full_filesystem(fs: str, device: str) -> bool:
    try:
        filesystems.make_filesystem(fs, device)
    except Internal:
        return False
    if fs != "ext4":
        return True
    # Below its minimum mkfs.ext4 still succeeds, leaving the journal out.
    header = subprocess.run(
        ["dumpe2fs", "-h", device], capture_output=True, text=True, timeout=60, check=True
    )
    return "has_journal" in header.stdout


@pytest.mark.parametrize("fs", filesystems.SUPPORTED)
def test_minimum_size_is_the_smallest_device_mkfs_makes_the_filesystem_on(
    fs: str, tmp_path: Path
) -> None:
    minimum = filesystems.MIN_SIZE_BYTES[fs]
    with nbd_like_device(tmp_path, minimum) as device:
        assert _makes_a_full_filesystem(fs, device)
    with nbd_like_device(tmp_path, minimum - 4096) as device:
        assert not _makes_a_full_filesystem(fs, device)


@pytest.mark.parametrize("fs", filesystems.SUPPORTED)
def test_a_capacity_below_the_minimum_is_out_of_range(fs: str) -> None:
    minimum = filesystems.MIN_SIZE_BYTES[fs]
    filesystems.check_capacity(fs, minimum)
    with pytest.raises(OutOfRange, match=f"{fs} needs a volume of at least {minimum} bytes"):
        filesystems.check_capacity(fs, minimum - 4096)
