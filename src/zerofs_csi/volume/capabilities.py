"""Which volume capabilities the driver supports, checked the same way by every RPC.

One ZeroFS writer per volume means one node at a time for writers: single-node access
modes. Several pods on that node may share the volume (bind mounts of one staged
filesystem). MULTI_NODE_READER_ONLY (Kubernetes' ReadOnlyMany) is the one multi-node
mode: such a volume is served on each node by a read-only server of its own (ZeroFS
``run --read-only``) and never written, so a volume created for it takes no writer
mode besides (``read_only_many_conflict``).
"""

from __future__ import annotations

from dataclasses import dataclass

from zerofs_csi.csi import csi_pb2
from zerofs_csi.errors import InvalidArgument
from zerofs_csi.host.filesystems import SUPPORTED as SUPPORTED_FILESYSTEMS
from zerofs_csi.host.mount_options import MountOptions

Mode = csi_pb2.VolumeCapability.AccessMode
SUPPORTED_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
        Mode.MULTI_NODE_READER_ONLY,
    }
)
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})


@dataclass(frozen=True)
class CheckedCapability:
    access_type: str  # "mount" or "block"
    fs_type: str  # "" for block, or when the request leaves it to the StorageClass
    mount_flags: tuple[str, ...]
    read_only: bool
    # MULTI_NODE_READER_ONLY: served by a read-only server, on any number of nodes.
    many_readers: bool = False


def unsupported_reason(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why the driver cannot serve ``cap``, or None when it can."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability needs an access type (mount or block)"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        name = Mode.Mode.Name(cap.access_mode.mode)
        return (
            f"access mode {name} is not supported: a ZeroFS volume has one writer, on one "
            "node (use a SINGLE_NODE_* mode, or MULTI_NODE_READER_ONLY for a volume no "
            "node writes)"
        )
    if kind == "mount":
        fs = cap.mount.fs_type
        if fs and fs not in SUPPORTED_FILESYSTEMS:
            return f"filesystem {fs!r} is not supported; choose one of " + ", ".join(
                SUPPORTED_FILESYSTEMS
            )
        if cap.mount.volume_mount_group:
            return "volume_mount_group is not supported"
        try:
            MountOptions.parse(tuple(cap.mount.mount_flags))
        except ValueError as exc:
            return str(exc)
    return None


def check_capability(cap: csi_pb2.VolumeCapability | None, field: str) -> CheckedCapability:
    """Validate one capability; InvalidArgument names ``field`` and what is wrong."""
    if cap is None:
        raise InvalidArgument(f"{field} is required")
    reason = unsupported_reason(cap)
    if reason:
        raise InvalidArgument(f"{field}: {reason}")
    read_only = cap.access_mode.mode in READ_ONLY_MODES
    many = cap.access_mode.mode == Mode.MULTI_NODE_READER_ONLY
    if cap.WhichOneof("access_type") == "block":
        return CheckedCapability("block", "", (), read_only, many)
    return CheckedCapability(
        "mount", cap.mount.fs_type, tuple(cap.mount.mount_flags), read_only, many
    )


def read_only_many_conflict(caps: list[CheckedCapability], read_only_many: bool) -> str | None:
    """Why ``caps`` do not fit a volume that is (or is not) ReadOnlyMany, or None."""
    if read_only_many and not all(cap.read_only for cap in caps):
        return (
            "the volume is MULTI_NODE_READER_ONLY (ReadOnlyMany): read-only servers on "
            "every node, no writer; a writer access mode does not fit it"
        )
    if not read_only_many and any(cap.many_readers for cap in caps):
        return (
            "MULTI_NODE_READER_ONLY is for a volume created with it (read-only servers on "
            "every node); this volume was created for one writer"
        )
    return None
