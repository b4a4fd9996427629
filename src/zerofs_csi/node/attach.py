"""The attach path as the node service uses it: NbdAttacher with gRPC-coded errors."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from zerofs_csi.errors import (
    CsiError,
    FailedPrecondition,
    Internal,
    NotFound,
    Unavailable,
)
from zerofs_csi.nbd import attach as nbd

DEFAULT_CONNECTIONS = nbd.DEFAULT_CONNECTIONS


@contextmanager
def attach_errors(what: str) -> Iterator[None]:
    """Turn attach-path OSErrors into CSI errors whose code tells the CO what to do."""
    try:
        yield
    except CsiError:
        raise
    except nbd.NbdModuleNotLoaded as exc:
        raise FailedPrecondition(f"{what}: {exc.strerror}", reason="ENOENT") from None
    except nbd.NbdPermissionError as exc:
        raise FailedPrecondition(f"{what}: {exc.strerror}", reason="EPERM") from None
    except nbd.NotOwner as exc:
        raise FailedPrecondition(f"{what}: {exc.strerror}", reason="EPERM") from None
    except nbd.ExportNotFound as exc:
        raise NotFound(f"{what}: {exc.strerror}", reason="ENOENT") from None
    except (nbd.HandshakeError, ConnectionError, TimeoutError) as exc:
        reason = errno.errorcode.get(exc.errno or 0, "ECONNREFUSED")
        raise Unavailable(f"{what}: {exc.strerror or exc}", reason=reason) from None
    except nbd.DeviceBusy as exc:
        raise Unavailable(f"{what}: {exc.strerror}", reason="EBUSY") from None
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "EIO")
        raise Internal(f"{what}: {exc.strerror or exc}", reason=reason) from None


class NodeAttacher:
    """Attaches with several connections when the server allows it, one otherwise."""

    def __init__(self, attacher: nbd.NbdAttacher, connections: int = DEFAULT_CONNECTIONS) -> None:
        self.nbd = attacher
        self._connections = connections

    def attach(
        self,
        nbd_socket: str,
        export: str,
        backend_id: str,
        connections: int | None = None,
        *,
        read_only: bool = False,
    ) -> nbd.Device:
        with attach_errors(f"attaching export {export} from {nbd_socket}"):
            try:
                return self.nbd.attach(
                    nbd_socket,
                    export,
                    backend_id,
                    connections=connections or self._connections,
                    read_only=read_only,
                )
            except nbd.MultiConnUnsupported:
                return self.nbd.attach(
                    nbd_socket, export, backend_id, connections=1, read_only=read_only
                )

    def detach(self, index: int, backend_id: str) -> None:
        with attach_errors(f"detaching nbd{index}"):
            self.nbd.detach(index, backend_id)

    def find_device(self, backend_id: str) -> nbd.Device | None:
        """The connected device serving ``backend_id``, or None; None as well without the
        nbd module, where no device can be connected (and so none is ours to undo)."""
        with attach_errors(f"looking up the device of {backend_id}"):
            try:
                return self.nbd.find_device(backend_id)
            except nbd.NbdModuleNotLoaded:
                return None

    def reconnect(
        self,
        index: int,
        backend_id: str,
        nbd_socket: str,
        export: str,
        connections: int | None = None,
        handshake_timeout_s: float = nbd.DEFAULT_HANDSHAKE_TIMEOUT_S,
        before_reconfigure: Callable[[], None] | None = None,
    ) -> None:
        with attach_errors(f"reconnecting nbd{index}"):
            self.nbd.reconnect(
                index,
                backend_id,
                nbd_socket,
                export,
                connections=connections,
                handshake_timeout_s=handshake_timeout_s,
                before_reconfigure=before_reconfigure,
            )
