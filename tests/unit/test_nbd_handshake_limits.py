"""The NBD handshake has one deadline and bounded replies, whatever the server sends.

A server that keeps answering, only slowly or without end, must not hold a handshake
(and the volume's lock with it) past ``timeout_s``: each of these scripted peers, on a
real unix socket, answers every read well within the per-read timeout. They play the
server byte for byte as doc/proto.md ("Fixed newstyle negotiation") lays it out, and
give up after STREAM_LIMIT_S, so that a client without a deadline fails slowly instead
of hanging the test.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standin.servers import recv_exact

from zerofs_csi.bench.plugin import wait_until
from zerofs_csi.nbd import _nbd

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAGS = 1 | 2  # FIXED_NEWSTYLE, NO_ZEROES
OPT_GO = 7
OPT_LIST = 3
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_POLICY = (1 << 31) + 2
INFO_NAME = 1
NBD_MAX_STRING = 4096  # nbd's own bound on names and messages (nbd-client, cliserv.h)
TIMEOUT_S = 2.0
# A client that honours TIMEOUT_S as a whole fails well before this.
WITHIN_S = TIMEOUT_S + 1.5
STREAM_LIMIT_S = 15.0

Script = Callable[[socket.socket], None]


def greeting(conn: socket.socket) -> None:
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAGS))


def read_option(conn: socket.socket) -> int:
    """One option from the client (after its 4 bytes of flags); returns its number."""
    magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
    assert magic == IHAVEOPT
    recv_exact(conn, length)
    return int(option)


def reply(option: int, rtype: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">QIII", REPLY_MAGIC, option, rtype, size) + payload


def until_limit() -> Iterator[None]:
    end = time.monotonic() + STREAM_LIMIT_S
    while time.monotonic() < end:
        yield


def info_forever(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    assert read_option(conn) == OPT_GO
    name = struct.pack(">H", INFO_NAME) + b"vol"
    for _ in until_limit():
        conn.sendall(reply(OPT_GO, REP_INFO, name))
        time.sleep(0.2)


def greeting_a_byte_at_a_time(conn: socket.socket) -> None:
    for byte in struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAGS):
        conn.sendall(bytes([byte]))
        time.sleep(0.5)
    recv_exact(conn, 4)
    read_option(conn)
    conn.sendall(reply(OPT_GO, REP_ACK))  # no INFO_EXPORT: refused if ever reached
    conn.recv(1)


def huge_info_trickled(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    read_option(conn)
    conn.sendall(reply(OPT_GO, REP_INFO, length=0xFFFFFFFF))
    for _ in until_limit():
        conn.sendall(b"\0")
        time.sleep(0.5)


def oversized_error(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    read_option(conn)
    message = b"refused " * (1 << 17)  # 1 MiB
    conn.sendall(reply(OPT_GO, REP_ERR_POLICY, message))
    conn.recv(1)


def oversized_info(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    read_option(conn)
    conn.sendall(reply(OPT_GO, REP_INFO, struct.pack(">H", INFO_NAME) + b"n" * 65536))
    conn.recv(1)


def exports_forever(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    assert read_option(conn) == OPT_LIST
    entry = struct.pack(">I", 3) + b"vol"
    for _ in until_limit():
        conn.sendall(reply(OPT_LIST, REP_SERVER, entry))
        time.sleep(0.2)


def oversized_export_entry(conn: socket.socket) -> None:
    greeting(conn)
    recv_exact(conn, 4)
    read_option(conn)
    name = b"n" * (NBD_MAX_STRING + 1)
    conn.sendall(reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(name)) + name))
    conn.recv(1)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Script], str]]:
    """Runs ``script`` for every connection to a fresh unix socket; returns its path."""
    listeners: list[socket.socket] = []

    def start(script: Script) -> str:
        path = str(tmp_path / f"nbd{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        listeners.append(listener)

        def one(conn: socket.socket) -> None:
            # OSError: the client gave up and closed, which is what it should do.
            with conn, contextlib.suppress(OSError):
                script(conn)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=one, args=(conn,), daemon=True).start()

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        return path

    yield start
    for listener in listeners:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def _fails_within(call: Callable[[], object], seconds: float) -> OSError:
    started = time.monotonic()
    with pytest.raises(_nbd.HandshakeError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.1f} s: {info.value}"
    return info.value


@pytest.mark.parametrize("connections", [1, 3])
@pytest.mark.parametrize(
    "script", [info_forever, greeting_a_byte_at_a_time], ids=lambda s: s.__name__
)
def test_a_server_that_keeps_talking_is_cut_off_at_the_deadline(
    serve: Callable[[Script], str], script: Script, connections: int
) -> None:
    path = serve(script)
    error = _fails_within(lambda: _nbd.negotiate(path, "vol", connections, TIMEOUT_S), WITHIN_S)
    assert error.errno == errno.ETIMEDOUT
    assert "in time" in str(error)


def test_the_deadline_spans_both_steps_of_a_handshake(serve: Callable[[Script], str]) -> None:
    path = serve(info_forever)
    started = time.monotonic()
    handshake = _nbd.Handshake(path, "vol", 1, TIMEOUT_S)
    time.sleep(1.0)  # the caller's own work between the steps counts
    error = _fails_within(handshake.finish, TIMEOUT_S)
    assert error.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < WITHIN_S


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (huge_info_trickled, "NBD_REP_INFO"),
        (oversized_info, "NBD_REP_INFO"),
        (oversized_error, "error reply"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_an_oversized_reply_is_a_protocol_error_at_once(
    serve: Callable[[Script], str], script: Script, words: str
) -> None:
    path = serve(script)
    error = _fails_within(lambda: _nbd.negotiate(path, "vol", 1, TIMEOUT_S), 1.0)
    assert error.errno == errno.EPROTO
    assert words in str(error) and "longer than" in str(error)


def test_listing_exports_has_the_same_deadline(serve: Callable[[Script], str]) -> None:
    path = serve(exports_forever)
    error = _fails_within(lambda: _nbd.list_exports(path, TIMEOUT_S), WITHIN_S)
    assert error.errno == errno.ETIMEDOUT


def test_an_oversized_export_list_entry_is_a_protocol_error(
    serve: Callable[[Script], str],
) -> None:
    path = serve(oversized_export_entry)
    error = _fails_within(lambda: _nbd.list_exports(path, TIMEOUT_S), 1.0)
    assert error.errno == errno.EPROTO


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("inf"), float("nan"), 86400.0])
def test_the_deadline_must_be_finite_and_positive(timeout_s: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        _nbd.negotiate(str(tmp_path / "none.sock"), "vol", 1, timeout_s)


def greeting_then_abort_seen(seen: list[tuple[int, int]]) -> Script:
    """Greets, then records the client's flags and option, as a probe must end it."""

    def script(conn: socket.socket) -> None:
        greeting(conn)
        (flags,) = struct.unpack(">I", recv_exact(conn, 4))
        seen.append((flags, read_option(conn)))

    return script


def not_nbd(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    conn.recv(1)


def greeting_stalled(conn: socket.socket) -> None:
    conn.sendall(struct.pack(">Q", NBDMAGIC))
    for _ in until_limit():
        time.sleep(0.2)


def test_greet_reads_the_greeting_and_ends_with_abort(serve: Callable[[Script], str]) -> None:
    seen: list[tuple[int, int]] = []
    path = serve(greeting_then_abort_seen(seen))
    assert _nbd.greet(path, TIMEOUT_S) == FLAGS
    wait_until(lambda: seen, TIMEOUT_S, "the probe's option")
    assert seen == [(FLAGS, 2)]  # NBD_OPT_ABORT


@pytest.mark.parametrize(
    ("script", "code"), [(not_nbd, errno.EPROTO), (greeting_stalled, errno.ETIMEDOUT)]
)
def test_greet_refuses_what_is_not_a_timely_nbd_server(
    serve: Callable[[Script], str], script: Script, code: int
) -> None:
    error = _fails_within(lambda: _nbd.greet(serve(script), TIMEOUT_S), WITHIN_S)
    assert error.errno == code


def test_greet_of_a_missing_socket_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        _nbd.greet(str(tmp_path / "nothing.sock"), TIMEOUT_S)
