"""Mounting on the paths the CO names, as the node service does it.

Target and staging paths lie in directories others can write to. They are walked one
component at a time from ``/`` with O_PATH|O_NOFOLLOW (a bind mount through a symlink
would land on its destination), and mounts go through the walked descriptor's
``/proc/self/fd`` path, so what is checked is what gets mounted on. mount(2) and
umount2(2) failures become CSI errors whose code tells the CO what to do; a busy mount
names the processes that hold it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator

from zerofs_csi.errors import CsiError, FailedPrecondition, Internal, ResourceExhausted
from zerofs_csi.host import mount_options, mounts

_OPEN_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECTORY_MODE = 0o750


class SymlinkInPath(FailedPrecondition):
    """A component of a CO-given path is a symlink: the driver does not follow it."""


def _components(path: str) -> list[str]:
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not absolute")
    return [part for part in os.path.normpath(path).split("/") if part]


def _refuse_symlink(path: str, walked: list[str]) -> SymlinkInPath:
    component = "/" + "/".join(walked)
    where = "is" if component == os.path.normpath(path) else f"lies under {component}, which is"
    return SymlinkInPath(
        f"{path} {where} a symlink; target and staging paths must not contain symlinks",
        reason="ELOOP",
    )


def _open_component(parent: int, name: str, make_directory: bool) -> int:
    try:
        return os.open(name, _OPEN_PATH, dir_fd=parent)
    except FileNotFoundError:
        if not make_directory:
            raise
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened like any other
        os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
    return os.open(name, _OPEN_PATH, dir_fd=parent)


@contextlib.contextmanager
def _walk(path: str, make_parents: bool) -> Iterator[tuple[int, str]]:
    """An O_PATH descriptor of ``path``'s parent directory, reached without following
    symlinks, and the last component's name. FileNotFoundError for a missing parent
    unless ``make_parents``; SymlinkInPath; NotADirectoryError."""
    parts = _components(path)
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "the root directory", path)
    fd = os.open("/", _OPEN_PATH | os.O_DIRECTORY)
    try:
        for depth, name in enumerate(parts[:-1]):
            child = _open_component(fd, name, make_parents)
            os.close(fd)
            fd = child
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise _refuse_symlink(path, parts[: depth + 1])
            if not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        yield fd, parts[-1]
    finally:
        os.close(fd)


def lookup(path: str) -> os.stat_result | None:
    """lstat of ``path``, reached without following symlinks; None when it (or a parent)
    does not exist. SymlinkInPath when it or a parent is a symlink."""
    try:
        with _walk(path, make_parents=False) as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_symlink(path, _components(path))
    return st


def _make(parent: int, name: str, kind: str) -> bool:
    """Make ``name`` in ``parent`` as a ``kind`` ("directory" or "file"); False when
    something is there already."""
    try:
        if kind == "directory":
            os.mkdir(name, DIRECTORY_MODE, dir_fd=parent)
        else:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o600, dir_fd=parent))
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def opened(path: str) -> Iterator[int]:
    """An O_PATH descriptor of the existing ``path``, reached without following
    symlinks. SymlinkInPath for a symlink anywhere along it."""
    with _walk(path, make_parents=False) as (parent, name):
        fd = os.open(name, _OPEN_PATH, dir_fd=parent)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _refuse_symlink(path, _components(path))
            yield fd
        finally:
            os.close(fd)


def make(path: str, kind: str) -> bool:
    """Make ``path`` as a ``kind`` ("directory" or "file"; parents as directories) unless
    it is one already, without following symlinks; True when this call made it."""
    with mount_errors(f"making {path}", path), _walk(path, make_parents=True) as (parent, name):
        made = _make(parent, name, kind)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise _refuse_symlink(path, _components(path))
        if kind == "directory" and not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path)
        if kind == "file" and stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "exists and is a directory", path)
        return made


def unclaimed(device: str) -> bool:
    """Whether no filesystem holds ``device`` in any mount namespace: an exclusive open
    fails with EBUSY while one does, also where this process cannot see the mount (a
    container's private copy of a publication)."""
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def fd_path(fd: int) -> str:
    """The path through which mount(2) reaches what ``fd`` refers to."""
    return f"/proc/self/fd/{fd}"


def remove_if_empty(path: str) -> bool:
    """Remove ``path`` when it is an empty directory or an empty regular file (what the
    driver makes as a mount target), without following symlinks. True when removed or
    already gone; False when something else is there."""
    try:
        with _walk(path, make_parents=False) as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=parent)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(name, dir_fd=parent)
            else:
                return False
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
            return False
        raise
    return True


# -- mount(2) and umount2(2) with CSI errors --------------------------------------------------


def _holders_of(path: str) -> str:
    """Who keeps the mount on ``path`` busy, as far as this process can see."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if stat.S_ISBLK(st.st_mode):
        rdev = st.st_rdev
        found = mounts.holders(lambda s: stat.S_ISBLK(s.st_mode) and s.st_rdev == rdev)
    else:
        dev = st.st_dev
        found = mounts.holders(lambda s: s.st_dev == dev)
    nested = [
        e.mountpoint for e in mounts.mountinfo() if e.mountpoint.startswith(path.rstrip("/") + "/")
    ]
    parts = [str(h) for h in found] + [f"a mount at {m}" for m in nested[:4]]
    if not parts:
        return (
            "; no process the plugin can see holds it: look on the node "
            f"(fuser -vm {path}) or in the pods that share it"
        )
    return "; in use by " + ", ".join(parts)


@contextlib.contextmanager
def mount_errors(what: str, path: str) -> Iterator[None]:
    """Turn mount and umount OSErrors into CSI errors whose code tells the CO what to do."""
    try:
        yield
    except CsiError:
        raise
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "EIO")
        message = f"{what}: {exc.strerror or exc}"
        if exc.errno == errno.EBUSY:
            # Retrying cannot help until the holder lets go.
            raise FailedPrecondition(message + _holders_of(path), reason=reason) from None
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            # ENOSPC from mount(2): the mount namespace is at fs.mount-max.
            raise ResourceExhausted(message, reason=reason) from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise FailedPrecondition(
                message + "; the node plugin must run privileged (CAP_SYS_ADMIN)", reason=reason
            ) from None
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
            raise FailedPrecondition(message, reason=reason) from None
        raise Internal(message, reason=reason) from None


def mount_filesystem(
    device: str, path: str, fs_type: str, options: mount_options.MountOptions
) -> None:
    """Mount ``device`` on the directory ``path``, made when missing."""
    make(path, "directory")
    with mount_errors(f"mounting {device} ({fs_type}) on {path}", path), opened(path) as fd:
        mounts.mount(device, fd_path(fd), fs_type, options.flags, options.data)


def bind(source: str, target: str, readonly: bool) -> None:
    """Bind ``source`` onto the existing ``target``, read-only when asked."""
    with mount_errors(f"bind mount of {source} on {target}", target):
        with opened(target) as fd:
            mounts.mount(source, fd_path(fd), None, mount_options.MS_BIND)
        if not readonly:
            return
        try:
            # A bind is made read-write; read-only takes a remount of the new mount,
            # which a descriptor opened now (through it) reaches.
            with opened(target) as fd:
                remount = mount_options.MS_BIND | mount_options.MS_REMOUNT | mount_options.MS_RDONLY
                mounts.mount("none", fd_path(fd), None, remount)
        except OSError:
            mounts.umount(target)
            raise


def unmount_own(path: str, what: str, ours: Callable[[mounts.MountEntry], bool]) -> bool:
    """Unmount the mounts on ``path`` that ``ours`` accepts, topmost first, up to the
    first that it does not. True when nothing is mounted on ``path`` any more."""
    with mount_errors(f"unmounting {what} from {path}", path):
        if lookup(path) is None:
            return True
        # umount2 by path (a descriptor on the mount would keep it busy): the path holds
        # no symlink, and a mountpoint cannot be renamed.
        mounts.unmount_all(path, ours)
        return mounts.find_mount(path) is None


def unmount_all(path: str, what: str) -> None:
    """Unmount everything on ``path``, which must hold no symlink."""
    unmount_own(path, what, lambda entry: True)
