"""NBD_OPT_GO refused: EXPORT_NAME is tried only when the server says ERR_UNSUP.

No server installable here refuses NBD_OPT_GO (nbdkit, nbd-server and qemu-nbd all
support it), so a scripted peer on a real unix socket plays that server, byte for byte
as the NBD protocol (doc/proto.md, "Fixed newstyle negotiation") lays it out.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from standin.servers import recv_exact

from zerofs_csi.nbd import _nbd

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME = 1
OPT_GO = 7
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_UNKNOWN = (1 << 31) + 6
EXPORT_SIZE = 8 << 20
TRANSMISSION_FLAGS = 0b1_0000_0101  # HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN


@dataclass
class ScriptedServer:
    """Greets, answers NBD_OPT_GO with ``go_reply`` and, when the client then sends
    NBD_OPT_EXPORT_NAME, answers it with the export's size and flags."""

    path: Path
    go_reply: int
    options_seen: list[tuple[int, bytes]] = field(default_factory=list)

    def serve_one(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
            conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
            recv_exact(conn, 4)  # the client's flags
            while True:
                try:
                    magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
                    data = recv_exact(conn, length)
                except ConnectionError:  # the client is done
                    return
                assert magic == IHAVEOPT
                self.options_seen.append((option, data))
                if option == OPT_GO:
                    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, OPT_GO, self.go_reply, 0))
                elif option == OPT_EXPORT_NAME:
                    # With NO_ZEROES agreed, no 124 bytes of padding follow.
                    conn.sendall(struct.pack(">QH", EXPORT_SIZE, TRANSMISSION_FLAGS))
                    conn.recv(1)  # holds the connection until the client closes it
                    return


@pytest.fixture
def scripted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    server = ScriptedServer(tmp_path / "nbd.sock", request.param)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(server.path))
    listener.listen(1)
    thread = threading.Thread(target=server.serve_one, args=(listener,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        listener.close()
        thread.join(timeout=10)


def go_name(data: bytes) -> str:
    (length,) = struct.unpack(">I", data[:4])
    return data[4 : 4 + length].decode()


@pytest.mark.parametrize("scripted", [REP_ERR_UNSUP], indirect=True)
def test_err_unsup_to_go_falls_back_to_export_name(scripted: ScriptedServer) -> None:
    with _nbd.negotiate(str(scripted.path), "vol-1", timeout_s=10) as neg:
        assert not neg.used_go
        assert neg.size_bytes == EXPORT_SIZE
        assert neg.transmission_flags == TRANSMISSION_FLAGS
        assert neg.can_multi_conn
    assert [option for option, _ in scripted.options_seen] == [OPT_GO, OPT_EXPORT_NAME]
    assert go_name(scripted.options_seen[0][1]) == "vol-1"
    assert scripted.options_seen[1][1] == b"vol-1"


@pytest.mark.parametrize(
    ("scripted", "error", "errno_name"),
    [
        (REP_ERR_POLICY, _nbd.HandshakeError, "EACCES"),
        (REP_ERR_UNKNOWN, _nbd.ExportNotFound, "ENOENT"),
    ],
    indirect=["scripted"],
)
def test_other_refusals_of_go_are_errors_without_export_name(
    scripted: ScriptedServer, error: type[Exception], errno_name: str
) -> None:
    with pytest.raises(error) as info:
        _nbd.negotiate(str(scripted.path), "vol-1", timeout_s=10)
    assert isinstance(info.value, OSError)
    assert info.value.errno == getattr(errno, errno_name)
    assert [option for option, _ in scripted.options_seen] == [OPT_GO]
