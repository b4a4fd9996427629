"""Publishing a staged volume into a pod: a bind mount, read-only when asked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from zerofs_csi import mounts
from zerofs_csi.errors import AlreadyExists, Internal
from zerofs_csi.stage_record import StageRecord


def _same_source(entry: mounts.MountEntry, record: StageRecord) -> bool:
    if record.access_type == "block":
        # A bind of the device node: the mount is devtmpfs's, rooted at the node's name.
        return entry.root.rstrip("/").endswith(f"/nbd{record.device_index}")
    return entry.source == record.device and entry.root == "/"


def publications(record: StageRecord) -> list[str]:
    """Where the staged volume is published now (its bind mounts, not the staging mount)."""
    if record.access_type == "block":
        return [e.mountpoint for e in mounts.mountinfo() if _same_source(e, record)]
    staged = mounts.find_mount(record.mount_path)
    if staged is None:
        return []
    return [
        e.mountpoint
        for e in mounts.mounts_of_device(staged.major_minor)
        if e.mountpoint != staged.mountpoint
    ]


def publish(record: StageRecord, target: str, readonly: bool) -> None:
    """Bind the staged filesystem (or device) onto ``target``. Idempotent.

    AlreadyExists when ``target`` already holds a different volume or the same one with
    a different read-only setting.
    """
    existing = mounts.find_mount(target)
    if existing is not None:
        if _same_source(existing, record) and existing.readonly == readonly:
            return
        raise AlreadyExists(
            f"{target} is already published ({'read-only' if existing.readonly else 'read-write'}"
            f" from {existing.source}{existing.root}); unpublish it first"
        )
    if record.access_type == "block":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        os.close(fd)
        source = record.device
    else:
        Path(target).mkdir(parents=True, exist_ok=True)
        source = record.mount_path
    try:
        mounts.bind_mount(source, target, readonly)
    except OSError as exc:
        raise Internal(f"bind mount of {source} on {target} failed: {exc.strerror}") from None


def unpublish(target: str) -> None:
    """Remove every mount on ``target`` and the target itself. Succeeds when absent."""
    if not os.path.lexists(target):
        return
    mounts.unmount_all(target)
    try:
        if os.path.isdir(target):
            os.rmdir(target)
        else:
            os.unlink(target)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise Internal(f"cannot remove {target}: {exc.strerror}") from None
