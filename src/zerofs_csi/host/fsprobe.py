"""What a block device holds, read with libblkid (util-linux) through ctypes, no exec.

A device counts as fresh only when libblkid finds no filesystem, partition table or
other signature and its first MiB is all zeroes: a new ZeroFS export is sparse, so
anything else is somebody's data and must never be formatted.

A caller that knows which filesystem to expect names it: libblkid then first looks for
that one superblock only (a read or two instead of one per known signature), and
probes everything only when it is not there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from functools import cache

# From blkid.h: superblock probing flags and the safeprobe return values.
BLKID_SUBLKS_TYPE = 1 << 5
BLKID_SUBLKS_USAGE = 1 << 7
_SAFEPROBE_FOUND = 0
_SAFEPROBE_NOTHING = 1
_SAFEPROBE_AMBIVALENT = -2
BLKID_FLTR_ONLYIN = 2

ZERO_CHECK_BYTES = 1 << 20


@dataclass(frozen=True)
class DeviceContents:
    fs_type: str | None  # e.g. "ext4", "xfs", "btrfs", "swap", "crypto_LUKS"
    partition_table: str | None  # "dos", "gpt"
    ambivalent: bool  # several signatures: libblkid refuses to choose
    zeroed_head: bool  # the first MiB reads as zeroes

    @property
    def fresh(self) -> bool:
        return (
            self.fs_type is None
            and self.partition_table is None
            and not self.ambivalent
            and self.zeroed_head
        )

    def describe(self) -> str:
        if self.fs_type:
            return f"a {self.fs_type} filesystem"
        if self.partition_table:
            return f"a {self.partition_table} partition table"
        if self.ambivalent:
            return "several conflicting signatures"
        if not self.zeroed_head:
            return "data of an unknown kind"
        return "nothing"


# What a new, sparse export holds.
BLANK = DeviceContents(fs_type=None, partition_table=None, ambivalent=False, zeroed_head=True)


@cache
def _libblkid() -> ctypes.CDLL:
    name = ctypes.util.find_library("blkid") or "libblkid.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.blkid_new_probe_from_filename.restype = ctypes.c_void_p
    lib.blkid_new_probe_from_filename.argtypes = [ctypes.c_char_p]
    lib.blkid_free_probe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_enable_superblocks.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_probe_set_superblocks_flags.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_probe_enable_partitions.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_probe_filter_superblocks_type.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p),
    ]
    lib.blkid_do_safeprobe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_lookup_value.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return lib


def _lookup(lib: ctypes.CDLL, probe: int, name: bytes) -> str | None:
    value = ctypes.c_char_p()
    if lib.blkid_probe_lookup_value(probe, name, ctypes.byref(value), None) != 0:
        return None
    return value.value.decode(errors="replace") if value.value else None


def _head_is_zero(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, ZERO_CHECK_BYTES, 0)
    finally:
        os.close(fd)
    return data.count(0) == len(data)


def _open_probe(lib: ctypes.CDLL, path: str) -> int:
    handle: int | None = lib.blkid_new_probe_from_filename(os.fsencode(path))
    if not handle:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, f"libblkid cannot open {path}: {os.strerror(err)}", path)
    return handle


def _holds(lib: ctypes.CDLL, path: str, fs_type: str) -> bool:
    """Whether ``path`` carries a ``fs_type`` superblock, looking for no other."""
    handle = _open_probe(lib, path)
    try:
        names = (ctypes.c_char_p * 2)(fs_type.encode(), None)
        lib.blkid_probe_enable_superblocks(handle, 1)
        lib.blkid_probe_set_superblocks_flags(handle, BLKID_SUBLKS_TYPE)
        if lib.blkid_probe_filter_superblocks_type(handle, BLKID_FLTR_ONLYIN, names) != 0:
            return False  # a type libblkid does not know: the full probe decides
        lib.blkid_probe_enable_partitions(handle, 0)
        if lib.blkid_do_safeprobe(handle) != _SAFEPROBE_FOUND:
            return False
        return _lookup(lib, handle, b"TYPE") == fs_type
    finally:
        lib.blkid_free_probe(handle)


def probe(path: str, expect: str | None = None) -> DeviceContents:
    """Read the signatures on ``path`` (a block device or an image file).

    With ``expect`` (a filesystem type), a device that holds that filesystem is
    recognised without probing for anything else.

    Blocks on device reads. Raises OSError (ENOENT, EACCES, EIO) when the device cannot
    be read.
    """
    lib = _libblkid()
    if expect and _holds(lib, path, expect):
        return DeviceContents(
            fs_type=expect, partition_table=None, ambivalent=False, zeroed_head=False
        )
    handle = _open_probe(lib, path)
    try:
        lib.blkid_probe_enable_superblocks(handle, 1)
        lib.blkid_probe_set_superblocks_flags(handle, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE)
        lib.blkid_probe_enable_partitions(handle, 1)
        result = lib.blkid_do_safeprobe(handle)
        if result < 0 and result != _SAFEPROBE_AMBIVALENT:
            err = ctypes.get_errno() or errno.EIO
            raise OSError(err, f"libblkid failed to probe {path}: {os.strerror(err)}", path)
        fs_type = pt_type = None
        if result == _SAFEPROBE_FOUND:
            fs_type = _lookup(lib, handle, b"TYPE")
            pt_type = _lookup(lib, handle, b"PTTYPE")
    finally:
        lib.blkid_free_probe(handle)
    found = fs_type is not None or pt_type is not None or result == _SAFEPROBE_AMBIVALENT
    return DeviceContents(
        fs_type=fs_type,
        partition_table=pt_type,
        ambivalent=result == _SAFEPROBE_AMBIVALENT,
        # Only a device with no signature at all needs its head read.
        zeroed_head=False if found else _head_is_zero(path),
    )
