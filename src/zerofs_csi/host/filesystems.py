"""Making and growing the filesystems the driver supports."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from zerofs_csi.errors import Internal, InvalidArgument, OutOfRange

SUPPORTED = ("ext4", "xfs", "btrfs")

# Options for a sparse network device: never discard (a whole-device TRIM is a round trip
# per extent to the object store and the export reads as zeroes anyway), and leave
# zeroing of inode tables and the journal to the sparse file instead of writing it.
_MKFS: dict[str, list[str]] = {
    "ext4": [
        "mkfs.ext4", "-F", "-q", "-m", "0",
        "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
    ],
    "xfs": ["mkfs.xfs", "-f", "-q", "-K"],
    "btrfs": ["mkfs.btrfs", "-f", "-q", "-K"],
}  # fmt: skip

# The smallest device each filesystem is made on with the options above, measured with
# e2fsprogs 1.47.0, xfsprogs 6.1.0 and btrfs-progs 6.2 (Debian 12) on sparse files
# attached as loop devices with 4096-byte sectors, the NBD block size, by bisection
# down to one 4 KiB block (test_filesystems.py checks both sides of each figure):
# - ext4: mkfs.ext4 succeeds from 224 KiB, but below 8 MiB (2048 blocks) it leaves
#   the journal out ("Filesystem too small for a journal"): 8 MiB is the minimum.
# - xfs: mkfs.xfs refuses a data section below 300 MiB.
# - btrfs: mkfs.btrfs refuses a device below 114294784 bytes (109 MiB).
MIN_SIZE_BYTES: dict[str, int] = {"ext4": 8 << 20, "xfs": 300 << 20, "btrfs": 109 << 20}

# Mount options that skip the journal's or log's replay, which needs to write: for a
# filesystem on a read-only device (a ReadOnlyMany volume's), mounted read-only.
NO_REPLAY_OPTIONS = {"ext4": "noload", "xfs": "norecovery", "btrfs": "nologreplay"}

MKFS_TIMEOUT_SECONDS = 600.0
GROW_TIMEOUT_SECONDS = 600.0


def check_supported(fs: str) -> None:
    if fs not in SUPPORTED:
        raise InvalidArgument(
            f"filesystem {fs!r} is not supported; choose one of {', '.join(SUPPORTED)}"
        )


def check_capacity(fs: str, capacity_bytes: int) -> None:
    """OutOfRange when ``fs`` cannot be made on ``capacity_bytes``: such a volume could
    be created but never staged."""
    check_supported(fs)
    minimum = MIN_SIZE_BYTES[fs]
    if capacity_bytes < minimum:
        raise OutOfRange(
            f"{fs} needs a volume of at least {minimum} bytes ({minimum >> 20} MiB); "
            f"this one would have {capacity_bytes}"
        )


def mkfs_argv(fs: str, device: str, extra: Sequence[str] = ()) -> list[str]:
    check_supported(fs)
    return [*_MKFS[fs], *extra, device]


def grow_argv(fs: str, device: str, mountpoint: str) -> list[str]:
    """The command that grows a mounted filesystem to fill its device."""
    check_supported(fs)
    if fs == "ext4":
        return ["resize2fs", device]
    if fs == "xfs":
        return ["xfs_growfs", mountpoint]
    return ["btrfs", "filesystem", "resize", "max", mountpoint]


def run_tool(argv: list[str], timeout: float, what: str) -> None:
    """Run a filesystem tool; failures become Internal with the tool's last words."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise Internal(f"{argv[0]} is not installed in the plugin image", reason="ENOENT") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{what} did not finish in {timeout:.0f} s", reason="ETIMEDOUT") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise Internal(
            f"{what} failed (exit {result.returncode}): {' | '.join(tail)}", reason="EIO"
        )


def make_filesystem(fs: str, device: str, extra: Sequence[str] = ()) -> None:
    run_tool(mkfs_argv(fs, device, extra), MKFS_TIMEOUT_SECONDS, f"mkfs.{fs} on {device}")


def grow_filesystem(fs: str, device: str, mountpoint: str) -> None:
    run_tool(grow_argv(fs, device, mountpoint), GROW_TIMEOUT_SECONDS, f"growing {fs} on {device}")
