"""mount(2) and umount2(2) through ctypes, and /proc/self/mountinfo, without exec."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from zerofs_csi.host.mount_options import MS_BIND, MS_RDONLY, MS_REMOUNT

# From include/linux/fs.h (umount2 flags).
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


@cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def _raise(action: str, path: str | os.PathLike[str]) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{action} failed: {os.strerror(err)}", os.fspath(path))


def mount(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str = "",
) -> None:
    """mount(2). Blocks while the filesystem reads its superblock and replays its journal."""
    result = _libc().mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if result != 0:
        _raise(f"mount {os.fspath(source)} ({fstype or 'bind'})", target)


def bind_mount(
    source: str | os.PathLike[str], target: str | os.PathLike[str], readonly: bool
) -> None:
    """Bind ``source`` onto ``target``; read-only binds need a second, remounting call."""
    mount(source, target, None, MS_BIND)
    if readonly:
        try:
            mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError:
            umount(target)
            raise


def umount(target: str | os.PathLike[str], flags: int = UMOUNT_NOFOLLOW) -> None:
    """umount2(2). Blocks while the filesystem writes back. EBUSY when still in use."""
    if _libc().umount2(os.fsencode(target), flags) != 0:
        _raise("umount", target)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major_minor: str
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (fs/proc_namespace.c).
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the format of proc(5) /proc/PID/mountinfo."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        sep = fields.index("-")
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                major_minor=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")),
            )
        )
    return entries


def mountinfo() -> list[MountEntry]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def find_mount(target: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount on exactly ``target``, or None."""
    path = os.path.realpath(target)
    found = None
    for entry in mountinfo():
        if entry.mountpoint == path:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def mounts_of_device(major_minor: str) -> list[MountEntry]:
    return [e for e in mountinfo() if e.major_minor == major_minor]


def is_mountpoint(target: str | os.PathLike[str]) -> bool:
    return find_mount(target) is not None


# Bounds the loop in unmount_all; nobody stacks this many mounts on a CSI path.
_MAX_STACKED = 32


def unmount_all(
    target: str | os.PathLike[str], ours: Callable[[MountEntry], bool] | None = None
) -> int:
    """Unmount the mounts stacked on ``target``, topmost first: all of them, or while
    ``ours`` accepts them. Returns how many were removed."""
    count = 0
    for _ in range(_MAX_STACKED):
        entry = find_mount(target)
        if entry is None or (ours is not None and not ours(entry)):
            return count
        try:
            umount(target)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: raced with another unmount
                raise
        else:
            count += 1
    raise OSError(errno.EBUSY, f"more than {_MAX_STACKED} mounts stacked", os.fspath(target))


@dataclass(frozen=True)
class Holder:
    """A process using a file on a filesystem: its working directory, root or an open file."""

    pid: int
    command: str
    how: str  # "working directory", "root" or "open file"
    path: str  # as the process sees it

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}, {self.how} {self.path})"


_HOLDS = (("cwd", "working directory"), ("root", "root"))


def holders(uses: Callable[[os.stat_result], bool], limit: int = 8) -> list[Holder]:
    """Processes visible in /proc whose working directory, root or open files ``uses``
    accepts (by their stat: a filesystem's st_dev, a device's st_rdev); at most ``limit``.
    Processes that exit or deny access meanwhile are skipped."""
    found: list[Holder] = []
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        links = [(entry / name, how) for name, how in _HOLDS]
        try:
            links += [(fd, "open file") for fd in (entry / "fd").iterdir()]
            command = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for link, how in links:
            try:
                if not uses(os.stat(link)):
                    continue
                path = os.readlink(link)
            except OSError:
                continue
            found.append(Holder(int(entry.name), command, how, path))
            if len(found) >= limit:
                return found
            break  # one line per process
    return found
