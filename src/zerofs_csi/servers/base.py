"""The per-volume ZeroFS server, seen from the node service.

Each staged volume has one ZeroFS process serving its storage path. Where it runs is a
backend's business: a pod pinned to this node (Kubernetes backend) or a child process
(local process backend, for tests and non-Kubernetes hosts). Both put the server's NBD
and 9P listeners on unix sockets under a host directory the node plugin can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zerofs_csi import errors
from zerofs_csi.servers.lives import LIVES_FILE
from zerofs_csi.volume.id import validate_volume_id

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL (man 7 unix).
UNIX_PATH_MAX = 107
# ZeroFS's admin service ([servers.rpc]) in a server's socket directory: named as long
# as nbd.sock, so that it fits wherever that does.
ADMIN_SOCKET = "rpc.sock"
# What ZeroFS logs when it exits because another server of the volume opened its storage
# since it started (SlateDB's fencing error, in "Fatal write error, exiting: Closed
# error: detected newer DB client"). Any other fatal write error exits with the same
# status 1, so the log is the one way to tell.
FENCED_MARKER = "detected newer DB client"


# Left in a volume's socket directory by the Kubernetes backend's server pod when its
# ZeroFS exited fenced (``pods.objects``): the pod does not start ZeroFS again.
FENCED_FILE = "fenced"


def fenced_in(server_output: str) -> bool:
    """Whether a server's output says it was fenced by a newer writer of its volume."""
    return FENCED_MARKER in server_output


@dataclass(frozen=True)
class ServerSockets:
    """Where a volume's server listens."""

    directory: Path
    nbd: Path
    ninep: Path

    @property
    def fenced(self) -> Path:
        """The mark of a server fenced by a newer writer of the volume (Kubernetes
        backend: its pod will not start ZeroFS again)."""
        return self.directory / FENCED_FILE

    @property
    def lives(self) -> Path:
        """When each of the volume's servers started and how it ended (``lives``)."""
        return self.directory / LIVES_FILE

    @property
    def admin(self) -> Path:
        """ZeroFS's admin service (``[servers.rpc]``: checkpoints, flush), where the
        backend configures one."""
        return self.directory / ADMIN_SOCKET

    @classmethod
    def under(cls, socket_root: Path, volume_id: str) -> ServerSockets:
        directory = socket_root / volume_id
        sockets = cls(directory, directory / "nbd.sock", directory / "9p.sock")
        for path in (sockets.nbd, sockets.ninep, sockets.admin):
            if len(str(path).encode()) > UNIX_PATH_MAX:
                raise ValueError(
                    f"socket path {path} is longer than the {UNIX_PATH_MAX} bytes a unix "
                    "socket address holds; choose a shorter --state-dir"
                )
        return sockets

    @classmethod
    def of_volume(cls, socket_root: Path, volume_id: str) -> ServerSockets:
        """``under`` for an id from a CSI call: a bad id or a socket path too long for
        the state directory is INVALID_ARGUMENT."""
        validate_volume_id(volume_id)
        try:
            return cls.under(socket_root, volume_id)
        except ValueError as exc:
            raise errors.InvalidArgument(str(exc)) from None


class VolumeServerBackend(Protocol):
    """Runs, finds and stops per-volume ZeroFS servers on this node.

    Implementations raise ``zerofs_csi.errors`` exceptions: InvalidArgument for a bad
    setting, Unavailable/DeadlineExceeded when the server does not become ready in time
    (with what is known of why), Internal for anything else. Secrets never appear in
    their errors or logs.
    """

    name: str

    def ensure(self, volume_id: str, settings: object, secrets: object) -> ServerSockets:
        """Start the volume's server (or reuse a ready one with the same config) and
        return its sockets once it answers. Idempotent. Blocks up to the settings'
        ready timeout."""
        ...

    def stop(self, volume_id: str) -> None:
        """Stop the volume's server and remove what ``ensure`` created. Succeeds when
        nothing is running. Bounded in time: never hangs forever."""
        ...

    def sockets(self, volume_id: str) -> ServerSockets:
        """Where the volume's server listens (whether or not it runs now)."""
        ...

    def running(self) -> list[str]:
        """Volume ids whose server this backend runs on this node."""
        ...
