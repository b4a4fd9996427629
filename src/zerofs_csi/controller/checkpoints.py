"""How the controller reaches a volume's ZeroFS server to checkpoint it.

A snapshot is a ZeroFS checkpoint of the volume's storage, and only a running server of
the volume can make one (ZeroFS's ``checkpoint create`` is a call of the running server's
admin service). ``VolumeCheckpoints`` is what the snapshot RPCs need: create a named
checkpoint (flushed first), find one, delete one.

``LocalCheckpoints`` serves the local backend, whose servers are children of the node
plugin on this host with their sockets under ``<state_dir>/sockets/<volume>/``; the
controller finds them there, so both roles must share ``--state-dir`` (``--role all``
does). For a volume:

- its server answers on ``rpc.sock``: the volume is staged here, and the checkpoint is
  taken through that server. When its filesystem is mounted (the node's stage record
  says where, ``mounted_filesystem``), the filesystem is frozen (FIFREEZE) for the flush
  and the checkpoint and thawed after, so the snapshot is a clean filesystem, not only a
  crash-consistent device; writers wait meanwhile. It is frozen only when the mount there
  is of the volume's device;
- no server answers but one is expected (the node backend keeps a state file for it, it
  is restarting, or the volume is published, so a NodeStage may start one at any
  moment): UNAVAILABLE, to be retried, so that never two servers write one volume;
- otherwise a short-lived server (``servers.brief``) is started, used and stopped, all
  under the volume's lock, which ControllerPublish also takes (in
  ``<state_dir>/ck/<hash of the volume id>/``: a short path, for its sockets). Starting
  one needs the volume's secrets, as NodeStage does: the CreateSnapshot or
  DeleteSnapshot secrets (the VolumeSnapshotClass's
  ``csi.storage.k8s.io/snapshotter-secret-*``).

The Kubernetes backend's ``KubeCheckpoints`` (``checkpoints_kube``) cannot reach the
volume's server from here: the controller runs on some node and the server pod on the
node that staged the volume, its admin socket in that node's host directory. So
CreateSnapshot and DeleteSnapshot write a CheckpointRequest through the API server
(``kube.checkpoint_requests``) for the volume's node (``VolumeRecord.published_node``),
whose node plugin carries it out (``node.checkpoint_requests``) the way
``LocalCheckpoints`` does here (``servers.checkpoint``: FIFREEZE, flush, checkpoint,
FITHAW) and writes the outcome into the request's status. A volume staged nowhere is
FAILED_PRECONDITION there: no short-lived server pod is started for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zerofs_csi import errors
from zerofs_csi.servers.admin import AdminClient, CheckpointInfo
from zerofs_csi.servers.base import ADMIN_SOCKET, UNIX_PATH_MAX
from zerofs_csi.servers.brief import brief_server
from zerofs_csi.servers.checkpoint import delete_checkpoint, take_checkpoint
from zerofs_csi.servers.export_copy import ServedExport, fill_export
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import parse_volume_settings

log = logging.getLogger(__name__)

# volume id -> (mount path, device) of its filesystem when it is staged and mounted here.
MountedFilesystem = Callable[[str], tuple[str, str] | None]
# Told how much of a new volume's copy is done (volume id, percent) as it goes, and
# None once it ended, however it ended (Metrics.report_copy).
CopyProgress = Callable[[str, int | None], None]


def no_progress(volume_id: str, percent: int | None) -> None:
    """A CopyProgress that tells nobody."""


class VolumeCheckpoints(Protocol):
    """Checkpoints of volumes. ``parameters`` are the volume's settings
    (``VolumeSettings.to_parameters``); ``published`` whether the volume is published
    to a node; ``csi_secrets`` the secrets of the CSI call, for a server that must be
    started. Errors carry their gRPC code."""

    # Whether ``restore`` can fill a new volume: CreateVolume from a snapshot or a
    # volume (CLONE_VOLUME) is offered only then.
    restores: bool
    # Whether a clone of a volume staged nowhere copies the volume itself, served by a
    # server started for the copy (``CheckpointSource.checkpoint`` None), rather than a
    # checkpoint taken for it: the volume may then not be published (check_publishable)
    # nor checkpointed until the copy ended.
    copies_idle_sources: bool

    def check_publishable(self, volume_id: str) -> None:
        """UNAVAILABLE while a server started for a checkpoint or a copy serves the
        volume: it may not be published (staged) meanwhile, two writers would fence each
        other."""
        ...

    def create(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> CheckpointInfo:
        """The volume's checkpoint ``name``: the one that exists, or a new one taken
        after a flush."""
        ...

    def delete(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> None:
        """Delete the volume's checkpoint ``name``; succeeds when there is none."""
        ...

    def restore(
        self,
        source: CheckpointSource,
        volume_id: str,
        parameters: Mapping[str, str],
        capacity_bytes: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        """Fill the new volume ``volume_id`` (staged nowhere) with the export of the
        checkpoint ``source`` (of the source volume itself when ``copies_idle_sources``
        and its checkpoint is None): its export created at ``capacity_bytes`` (at least
        the source's), the source's data copied into it, flushed."""
        ...


# The checkpoint a clone copies is named after the new volume, with this prefix (no
# snapshot key has a ':', so it is never a snapshot's).
CLONE_CHECKPOINT_PREFIX = "clone:"


class JobInProgress(errors.Unavailable):
    """A restore or a checkpoint runs on elsewhere (a job pod): the call is to be
    retried, and what the job reads (a clone's checkpoint) must stay until it ends."""


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint of a volume, to read a new volume's data from; or the volume
    itself (``checkpoint`` None), staged nowhere and so written by nobody."""

    volume_id: str
    parameters: Mapping[str, str]  # the volume's settings
    checkpoint: str | None  # its name


class LocalCheckpoints:
    """Checkpoints through the local backend's servers (see the module docstring).

    ``restore`` runs two short-lived servers: the source volume's serving the checkpoint
    (``run --checkpoint``, read-only, which ZeroFS allows beside the volume's writer) and
    the new volume's, and copies the one export into the other with nbdcopy (libnbd):
    holes and zero blocks are skipped (the new export is all zeroes), memory bounded by
    its requests in flight. The new volume's server gets the CreateVolume secrets, and
    so does the source's: a restore reads a snapshot with the new volume's secrets.
    """

    restores = True
    # A clone's source staged nowhere is checkpointed by a server started within the
    # call, under the source's lock, like a snapshot of it.
    copies_idle_sources = False

    def __init__(
        self,
        state_dir: Path,
        socket_root: Path,
        command: Sequence[str],
        mounted_filesystem: MountedFilesystem = lambda volume_id: None,
        copy_progress: CopyProgress = no_progress,
    ) -> None:
        self._state_dir = state_dir
        self._socket_root = socket_root
        self._command = list(command)
        self._mounted_filesystem = mounted_filesystem
        self._copy_progress = copy_progress

    def check_publishable(self, volume_id: str) -> None:
        pass  # the short-lived servers run within a call, under the volume's lock

    def create(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> CheckpointInfo:
        with self._server(volume_id, parameters, published, csi_secrets) as server:
            return take_checkpoint(server, volume_id, name, self._mounted_filesystem(volume_id))

    def delete(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> None:
        with self._server(volume_id, parameters, published, csi_secrets) as server:
            delete_checkpoint(server, name)

    def restore(
        self,
        source: CheckpointSource,
        volume_id: str,
        parameters: Mapping[str, str],
        capacity_bytes: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        if source.checkpoint is None:
            raise errors.Internal(
                f"volume {volume_id}: the local backend restores from checkpoints only"
            )
        secrets = volume_secrets(volume_id, csi_secrets)
        reader = brief_server(
            self._command,
            self._directory(f"{source.volume_id}@{source.checkpoint}"),
            source.volume_id,
            parse_volume_settings(source.parameters),
            secrets,
            run_args=("--checkpoint", source.checkpoint),
        )
        writer = brief_server(
            self._command,
            self._directory(volume_id),
            volume_id,
            parse_volume_settings(parameters),
            secrets,
        )
        with reader as checkpoint, writer as target:
            self._fill(
                ServedExport(source.volume_id, checkpoint.nbd, checkpoint.ninep),
                ServedExport(volume_id, target.nbd, target.ninep),
                capacity_bytes,
            )
            target.admin.flush()

    def _fill(self, source: ServedExport, target: ServedExport, capacity_bytes: int) -> None:
        """fill_export, its progress reported, and logged at each tenth."""
        report = progress_reporter(target.export, self._copy_progress)
        try:
            fill_export(source, target, capacity_bytes, progress=report)
        finally:
            self._copy_progress(target.export, None)

    def _directory(self, what: str) -> Path:
        # Short: the server's sockets' paths must fit a unix socket address (107 bytes).
        return self._state_dir / "ck" / hashlib.sha256(what.encode()).hexdigest()[:12]

    @contextlib.contextmanager
    def _server(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        csi_secrets: Mapping[str, str],
    ) -> Iterator[AdminClient]:
        # Where the node backend's server listens (ServerSockets.under); a path too long
        # for a socket address means no server of the volume can run here.
        admin_socket = self._socket_root / validate_volume_id(volume_id) / ADMIN_SOCKET
        expected = (self._state_dir / "servers" / volume_id / "server.json").exists()
        if len(bytes(admin_socket)) <= UNIX_PATH_MAX:
            # A server started a moment ago serves NBD before its admin service (ZeroFS
            # starts them independently): give it a few seconds before answering retry.
            deadline = time.monotonic() + (ADMIN_START_WAIT_S if expected else 0.0)
            while True:
                if admin_socket.exists():
                    with AdminClient(admin_socket, f"server of volume {volume_id}") as running:
                        if running.answers():
                            yield running
                            return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        if published or expected:
            raise errors.Unavailable(
                f"volume {volume_id} is staged or about to be on this host, and its server "
                f"does not answer on {admin_socket}: retry once it is back"
            )
        secrets = volume_secrets(volume_id, csi_secrets)
        settings = parse_volume_settings(parameters)
        directory = self._directory(volume_id)
        with brief_server(self._command, directory, volume_id, settings, secrets) as server:
            yield server.admin


def progress_reporter(volume_id: str, copy_progress: CopyProgress) -> Callable[[int], None]:
    """A copy's progress callback for new volume ``volume_id``: told to
    ``copy_progress`` each time, logged at each tenth."""
    logged = -1

    def report(percent: int) -> None:
        nonlocal logged
        copy_progress(volume_id, percent)
        if percent // 10 > logged:
            logged = percent // 10
            log.info(
                "copying the new volume's data", extra={"volume_id": volume_id, "percent": percent}
            )

    return report


def volume_secrets(volume_id: str, csi_secrets: Mapping[str, str]) -> VolumeSecrets:
    try:
        return VolumeSecrets.from_csi_secrets(csi_secrets)
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(
            f"volume {volume_id} is staged nowhere, and starting its server needs its secrets "
            "in the call (a VolumeSnapshotClass's csi.storage.k8s.io/snapshotter-secret-name "
            "and -namespace; for a restore or a clone, the StorageClass's "
            f"provisioner-secret-name and -namespace): {exc.message}"
        ) from None


# How long a snapshot waits for the admin service of a volume's running server.
ADMIN_START_WAIT_S = 15.0
