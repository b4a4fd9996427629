"""A client of a volume server's admin service (ZeroFS's ``zerofs.admin.AdminService``
on ``[servers.rpc] unix_socket``): flush and the checkpoint calls.

ZeroFS 2.3 answers every failure of CreateCheckpoint and DeleteCheckpoint with INTERNAL
and a message (a taken name, an unknown one), and only GetCheckpointInfo has a code of
its own for a missing checkpoint (NOT_FOUND). So what exists is asked with
GetCheckpointInfo, never read from an error's text: ``find`` first, then ``create`` or
``delete``, which callers do under the volume's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc

from zerofs_csi import errors
from zerofs_csi.zerofs_admin import admin_pb2, admin_pb2_grpc

T = TypeVar("T")
# A checkpoint waits for a flush of everything the server holds: generous.
CALL_TIMEOUT_S = 300.0
# Whether anything answers on the socket.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CheckpointInfo:
    id: str  # a UUID, the server's
    name: str
    created_at: datetime  # whole seconds, UTC


def _info(message: admin_pb2.CheckpointInfo) -> CheckpointInfo:
    created = datetime.fromtimestamp(message.created_at.seconds, UTC)
    return CheckpointInfo(id=message.id, name=message.name, created_at=created)


class AdminClient:
    """Calls the admin service on the unix socket ``socket_path``. Failures are
    Unavailable when the server does not answer in time and Internal otherwise, with
    the server's message; ``what`` names the server in them."""

    def __init__(self, socket_path: Path, what: str) -> None:
        self.socket_path = socket_path
        self._what = what
        # gRPC's default :authority for a unix socket is its path, which ZeroFS's HTTP/2
        # server (h2) refuses as no valid authority: every call ended in RST_STREAM.
        self._channel = grpc.insecure_channel(
            f"unix:{socket_path}", options=[("grpc.default_authority", "localhost")]
        )
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def answers(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Whether the admin service answers a listing within ``timeout``."""
        try:
            self._stub.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return True

    def flush(self) -> None:
        self._call(
            "flush", lambda: self._stub.Flush(admin_pb2.FlushRequest(), timeout=CALL_TIMEOUT_S)
        )

    def find(self, name: str) -> CheckpointInfo | None:
        request = admin_pb2.GetCheckpointInfoRequest(name=name)
        try:
            reply = self._stub.GetCheckpointInfo(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(f"looking up checkpoint {name!r}", exc) from None
        return _info(reply.checkpoint)

    def create(self, name: str) -> CheckpointInfo:
        request = admin_pb2.CreateCheckpointRequest(name=name)
        reply = self._call(
            f"creating checkpoint {name!r}",
            lambda: self._stub.CreateCheckpoint(request, timeout=CALL_TIMEOUT_S),
        )
        return _info(reply.checkpoint)

    def delete(self, name: str) -> None:
        request = admin_pb2.DeleteCheckpointRequest(name=name)
        self._call(
            f"deleting checkpoint {name!r}",
            lambda: self._stub.DeleteCheckpoint(request, timeout=CALL_TIMEOUT_S),
        )

    def list(self) -> list[CheckpointInfo]:
        reply = self._call(
            "listing checkpoints",
            lambda: self._stub.ListCheckpoints(
                admin_pb2.ListCheckpointsRequest(), timeout=CALL_TIMEOUT_S
            ),
        )
        return [_info(checkpoint) for checkpoint in reply.checkpoints]

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: grpc.RpcError) -> errors.CsiError:
        code = exc.code()
        details = exc.details() or code.name
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return errors.Unavailable(
                f"{what}: the {self._what} does not answer on {self.socket_path} ({details})",
                reason=code.name,
            )
        return errors.Internal(f"{what}: the {self._what} answered {code.name}: {details}")
