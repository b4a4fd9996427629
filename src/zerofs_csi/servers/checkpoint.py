"""Taking a checkpoint through a running server of the volume, wherever that server runs
(the local backend's controller, the Kubernetes backend's node plugin).

When the volume's filesystem is mounted on this host, it is frozen (FIFREEZE) for the
flush and the checkpoint and thawed after, so the checkpoint holds a clean filesystem,
not only a crash-consistent device; writers wait meanwhile. It is frozen only when the
mount there is of the volume's device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from zerofs_csi import errors
from zerofs_csi.host import freeze, mounts
from zerofs_csi.servers.admin import AdminClient, CheckpointInfo

log = logging.getLogger(__name__)

# (mount path, device) of a volume's filesystem staged and mounted on this host.
Mounted = tuple[str, str]


def take_checkpoint(
    server: AdminClient, volume_id: str, name: str, mounted: Mounted | None
) -> CheckpointInfo:
    """The volume's checkpoint ``name``: the one that exists, or a new one taken after a
    flush, the filesystem ``mounted`` frozen meanwhile. Callers hold the volume's lock."""
    existing = server.find(name)
    if existing is not None:
        return existing
    with frozen_filesystem(volume_id, mounted):
        server.flush()
        return server.create(name)


def delete_checkpoint(server: AdminClient, name: str) -> None:
    """Delete the checkpoint ``name``; succeeds when there is none."""
    if server.find(name) is not None:
        server.delete(name)


@contextlib.contextmanager
def frozen_filesystem(volume_id: str, mounted: Mounted | None) -> Iterator[None]:
    """The volume's filesystem frozen while the block runs, if it is mounted here."""
    entry = mounts.find_mount(mounted[0]) if mounted is not None else None
    if mounted is None or entry is None or entry.source != mounted[1]:
        yield  # nothing of this volume is mounted here: nothing writes through it
        return
    try:
        with freeze.frozen(mounted[0]):
            log.info("filesystem frozen", extra={"volume_id": volume_id})
            yield
    except OSError as exc:
        raise errors.Internal(
            f"freezing the filesystem of volume {volume_id} at {mounted[0]}: {exc.strerror}"
        ) from None
