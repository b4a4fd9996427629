"""Whether a staged volume's device may be connected to a later life of its server.

A server that ended other than by its graceful shutdown may have taken writes with it
that it had answered and not flushed (``servers.lives``), and the kernel would send the
flush that was in flight to the next server, which answers it: the filesystem would take
lost data for durable. Such a device is disconnected instead (its I/O fails), and stays
so until the volume is unstaged and staged again, which mounts what the server flushed
(the filesystem's journal replayed, as after a power cut). A volume with ``syncWrites``
or a read-only device never has unflushed writes.
"""

from __future__ import annotations

from zerofs_csi.errors import FailedPrecondition
from zerofs_csi.node.stage_record import StageRecord
from zerofs_csi.servers import lives


class WritesLost(FailedPrecondition):
    """The device's server may have lost writes it acknowledged."""


def writes_lost(record: StageRecord) -> str | None:
    """What may have lost the device's acknowledged writes since its attach, or None."""
    if record.sync_writes or record.read_only_device:
        return None
    reason = lives.lost_writes(record.socket_directory, record.server_life)
    if reason is None:
        return None
    return (
        f"{reason} while serving {record.device}, whose writes it may have answered "
        "without flushing them (the volume has no syncWrites); the device is not "
        "connected to the next server, so that no lost write is reported durable: "
        "unstage and stage the volume (restart the pods using it) to mount the data "
        "the server flushed"
    )


def check_writes_kept(record: StageRecord) -> None:
    """Raise WritesLost when ``writes_lost`` says why."""
    reason = writes_lost(record)
    if reason is not None:
        raise WritesLost(f"volume {record.volume_id}: {reason}")
