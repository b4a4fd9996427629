"""Publishing a staged volume into a pod: a bind mount, read-only when asked.

A publication goes into the stage record before its target is made and leaves it once
the target is gone. Unpublish undoes only what is the volume's: a target the record
lists, or one holding a bind of the volume's staged filesystem (or device), which is
how publications made before the record listed them are known. Any other file,
directory or mount at the path is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator

from zerofs_csi.errors import AlreadyExists, FailedPrecondition
from zerofs_csi.host import mounts
from zerofs_csi.node import mounts as node_mounts
from zerofs_csi.node.stage_record import Publication, RecordStore, StageRecord

log = logging.getLogger(__name__)

# The one access mode that allows a single publication on the node (the CSI spec's
# table for plugins with the SINGLE_NODE_MULTI_WRITER capability).
SINGLE_WRITER = "SINGLE_NODE_SINGLE_WRITER"


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


def _recorded(
    records: RecordStore, record: StageRecord, kept: Iterable[Publication]
) -> StageRecord:
    record = dataclasses.replace(record, publications=tuple(kept))
    records.write(record)
    return record


def _source(record: StageRecord) -> str:
    if record.access_type == "block":
        return record.device
    staged = mounts.find_mount(record.mount_path)
    if staged is None or staged.source != record.device:
        # A bind of the bare directory would publish an empty directory as the volume.
        raise FailedPrecondition(
            f"volume {record.volume_id} is not mounted at {record.mount_path}; stage it again"
        )
    return record.mount_path


def _check_other_targets(record: StageRecord, target: str, access_mode: str) -> None:
    """FailedPrecondition when a single-writer publication and another target would meet."""
    others = [t for t in publications(record) if t != target]
    if not others:
        return
    modes = {p.target: p.access_mode for p in record.publications}
    if access_mode == SINGLE_WRITER:
        raise FailedPrecondition(
            f"volume {record.volume_id} is already published at {', '.join(others)}; "
            f"{SINGLE_WRITER} allows one publication on the node: unpublish it first"
        )
    single = [t for t in others if modes.get(t) == SINGLE_WRITER]
    if single:
        raise FailedPrecondition(
            f"volume {record.volume_id} is published at {', '.join(single)} as "
            f"{SINGLE_WRITER}, which allows no other publication on the node"
        )


def publish(
    records: RecordStore, record: StageRecord, target: str, access_mode: str, readonly: bool
) -> None:
    """Bind the staged filesystem (or device) onto ``target``. Idempotent.

    AlreadyExists when ``target`` already holds a different volume or the same one with
    other arguments; FailedPrecondition when a single-writer publication would have
    company, or ``target`` lies on a symlink.
    """
    wanted = Publication(target, access_mode, readonly)
    known = {p.target: p for p in record.publications}
    existing = mounts.find_mount(target) if node_mounts.lookup(target) is not None else None
    if existing is not None:
        previous = known.get(target, wanted)  # unlisted: published before the record listed
        if _same_source(existing, record) and existing.readonly == readonly and previous == wanted:
            if target not in known:
                _recorded(records, record, [*record.publications, wanted])
            return
        raise AlreadyExists(
            f"{target} is already published ({'read-only' if existing.readonly else 'read-write'}"
            f" from {existing.source}{existing.root}"
            + (f" as {previous.access_mode}" if previous != wanted else "")
            + "); unpublish it first"
        )
    _check_other_targets(record, target, access_mode)
    source = _source(record)
    others = [p for p in record.publications if p.target != target]
    record = _recorded(records, record, [*others, wanted])
    made = False
    try:
        made = node_mounts.make(target, "file" if record.access_type == "block" else "directory")
        node_mounts.bind(source, target, readonly)
    except BaseException:
        if made:
            node_mounts.remove_if_empty(target)
        _recorded(records, record, others)
        raise


def _holds_publication(record: StageRecord, target: str, listed: bool) -> bool:
    """Whether what is at ``target`` is the volume's publication, to be undone."""
    try:
        if node_mounts.lookup(target) is None:
            return False
    except node_mounts.SymlinkInPath:
        return False  # publish refuses symlinks: this is somebody else's
    entry = mounts.find_mount(target)
    if entry is None:
        return listed  # made by a publish that did not get to mount, or lost its mount
    if _same_source(entry, record):
        return True
    if listed:
        raise FailedPrecondition(
            f"{target} holds a mount of {entry.source}{entry.root}, not of volume "
            f"{record.volume_id}; unmount it first"
        )
    return False


def unpublish(records: RecordStore, record: StageRecord | None, target: str) -> None:
    """Undo the volume's publication at ``target``: unmount its binds and remove the
    target it made. Anything else there is left alone. Succeeds when there is nothing.
    ``record`` is the volume's stage record; None when it is not staged on the node."""
    if record is None:
        return  # not staged: no publication of it can be left
    listed = any(p.target == target for p in record.publications)
    if _holds_publication(record, target, listed):
        cleared = node_mounts.unmount_own(
            target, f"volume {record.volume_id}", lambda entry: _same_source(entry, record)
        )
        if cleared and not node_mounts.remove_if_empty(target):
            log.warning(
                "publication target left in place: it is not empty",
                extra={"volume_id": record.volume_id, "target": target},
            )
    if listed:
        _recorded(records, record, [p for p in record.publications if p.target != target])


@contextlib.contextmanager
def set_aside(records: RecordStore, record: StageRecord, target: str) -> Iterator[None]:
    """Unmount the volume's publication at ``target`` for the block and bind it again
    after, read-only as it was, from the stage the block leaves (also when the block
    fails). The target stays in place and listed in the record.

    For kubelet's expansion of a filesystem on mount: it calls NodeExpandVolume with the
    pod's publication made and the pod's containers not yet started."""
    entry = mounts.find_mount(target) if target in publications(record) else None
    if entry is None:
        yield
        return
    node_mounts.unmount_own(
        target, f"volume {record.volume_id}", lambda found: _same_source(found, record)
    )
    try:
        yield
    finally:
        staged = records.read(record.staging_path) or record
        node_mounts.bind(_source(staged), target, entry.readonly)
