"""How the controller reaches a volume's ZeroFS server to checkpoint it.

A snapshot is a ZeroFS checkpoint of the volume's storage, and only a running server of
the volume can make one (ZeroFS's ``checkpoint create`` is a call of the running server's
admin service). ``VolumeCheckpoints`` is what the snapshot RPCs need: create a named
checkpoint (flushed first), find one, delete one.

``LocalCheckpoints`` serves the local backend, whose servers are children of the node
plugin on this host with their sockets under ``<state_dir>/sockets/<volume>/``; the
controller finds them there, so both roles must share ``--state-dir`` (``--role all``
does). For a volume:

- its server answers on ``admin.sock``: the volume is staged here, and the checkpoint is
  taken through that server, under the writes of its workload;
- no server answers but one is expected (the node backend keeps a state file for it, it
  is restarting, or the volume is published, so a NodeStage may start one at any
  moment): UNAVAILABLE, to be retried, so that never two servers write one volume;
- otherwise a short-lived server (``servers.brief``) is started, used and stopped, all
  under the volume's lock, which ControllerPublish also takes (in
  ``<state_dir>/ck/<hash of the volume id>/``: a short path, for its sockets). Starting
  one needs the volume's secrets, as NodeStage does: the CreateSnapshot or
  DeleteSnapshot secrets (the VolumeSnapshotClass's
  ``csi.storage.k8s.io/snapshotter-secret-*``).

The Kubernetes backend (not built yet) cannot reach the volume's server from here: the
controller runs on some node and the server pod on the node that staged the volume, its
admin socket in that node's host directory. The design: CreateSnapshot records a request
through the API server (an object naming the volume, the checkpoint name and the
requesting controller, owned by the driver's namespace), which the node plugin of the
volume's node (``VolumeRecord.published_node``) watches and carries out: FIFREEZE of the
mounted filesystem, flush and checkpoint through the admin socket, FITHAW, then the
result written into the object's status, which the controller waits for (the
snapshotter retries on UNAVAILABLE meanwhile). RBAC: only the controller's service
account may create these objects and only node plugins may update their status, each
node plugin acting only on volumes staged on its own node. A volume staged nowhere gets
a short-lived server pod, started by the controller as the node backend starts one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from zerofs_csi import errors
from zerofs_csi.servers.admin import AdminClient, CheckpointInfo
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.brief import brief_server
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import parse_volume_settings


class VolumeCheckpoints(Protocol):
    """Checkpoints of volumes. ``parameters`` are the volume's settings
    (``VolumeSettings.to_parameters``); ``published`` whether the volume is published
    to a node; ``csi_secrets`` the secrets of the CSI call, for a server that must be
    started. Errors carry their gRPC code."""

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


class LocalCheckpoints:
    """Checkpoints through the local backend's servers (see the module docstring)."""

    def __init__(self, state_dir: Path, socket_root: Path, command: Sequence[str]) -> None:
        self._state_dir = state_dir
        self._socket_root = socket_root
        self._command = list(command)

    def create(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> CheckpointInfo:
        with self._server(volume_id, parameters, published, csi_secrets) as server:
            existing = server.find(name)
            if existing is not None:
                return existing
            server.flush()
            return server.create(name)

    def delete(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        name: str,
        csi_secrets: Mapping[str, str],
    ) -> None:
        with self._server(volume_id, parameters, published, csi_secrets) as server:
            if server.find(name) is not None:
                server.delete(name)

    @contextlib.contextmanager
    def _server(
        self,
        volume_id: str,
        parameters: Mapping[str, str],
        published: bool,
        csi_secrets: Mapping[str, str],
    ) -> Iterator[AdminClient]:
        sockets = ServerSockets.of_volume(self._socket_root, volume_id)
        with AdminClient(sockets.admin, f"server of volume {volume_id}") as running:
            if sockets.admin.exists() and running.answers():
                yield running
                return
        if published or (self._state_dir / "servers" / volume_id / "server.json").exists():
            raise errors.Unavailable(
                f"volume {volume_id} is staged or about to be on this host, and its server "
                f"does not answer on {sockets.admin}: retry once it is back"
            )
        try:
            secrets = VolumeSecrets.from_csi_secrets(csi_secrets)
        except errors.InvalidArgument as exc:
            raise errors.InvalidArgument(
                f"volume {volume_id} is not staged, and starting its server needs its secrets "
                "(the VolumeSnapshotClass's csi.storage.k8s.io/snapshotter-secret-name and "
                f"-namespace): {exc.message}"
            ) from None
        # Short: its sockets' paths must fit a unix socket address (107 bytes).
        directory = self._state_dir / "ck" / hashlib.sha256(volume_id.encode()).hexdigest()[:12]
        settings = parse_volume_settings(parameters)
        with brief_server(self._command, directory, volume_id, settings, secrets) as server:
            yield server
