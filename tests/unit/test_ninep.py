"""The 9P2000.L client against a real 9P server (diod) and a few scripted misbehaviours.

diod listens on a unix socket itself (``diod -l /path/sock``), so no socat bridge is
needed; it exports a temporary directory and wants that path as the attach name.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standin.servers import diod_server

from zerofs_csi import errors
from zerofs_csi.servers import ninep

GiB = 1 << 30


class Export:
    def __init__(self, root: Path, sock: Path) -> None:
        self.root = root
        self.sock = sock

    def ensure(self, name: str, size: int) -> int:
        return self.prepare(name, size).size_bytes

    def prepare(self, name: str, size: int) -> ninep.ExportFile:
        return ninep.prepare_export(self.sock, name, size, aname=str(self.root), timeout=5)

    def size(self, name: str) -> int | None:
        return ninep.export_size(self.sock, name, aname=str(self.root), timeout=5)

    def host_path(self, name: str) -> Path:
        return self.root / ".nbd" / name


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    root = tmp_path / "fs"
    root.mkdir()
    sock = tmp_path / "9p.sock"
    with diod_server(root, sock):
        yield Export(root, sock)


# ---------------------------------------------------------------------------------
# Golden bytes


@pytest.mark.parametrize(
    ("message", "expected_hex"),
    [
        # size=21 type=100 tag=NOTAG msize=65536 version="9P2000.L"
        (ninep.tversion(65536), "15000000 64 ffff 00000100 0800 3950323030302e4c"),
        # size=27 type=104 tag=1 fid=0 afid=NOFID uname="root" aname="" n_uname=0
        (
            ninep.tattach(1, 0, "root", "", 0),
            "1b000000 68 0100 00000000 ffffffff 0400 726f6f74 0000 00000000",
        ),
        # size=23 type=110 tag=2 fid=0 newfid=1 nwname=1 ".nbd"
        (ninep.twalk(2, 0, 1, (".nbd",)), "17000000 6e 0200 00000000 01000000 0100 04002e6e6264"),
        # size=30 type=14 tag=4 fid=1 name="pvc-1" flags=O_RDWR|O_CREAT|O_EXCL mode=0600 gid=0
        (
            ninep.tlcreate(4, 1, "pvc-1", 0o302, 0o600, 0),
            "1e000000 0e 0400 01000000 0500 7076632d31 c2000000 80010000 00000000",
        ),
        # size=67 type=26 tag=3 fid=2 valid=SIZE mode/uid/gid=0 size=1GiB times=0
        (
            ninep.tsetattr_size(3, 2, GiB),
            "43000000 1a 0300 02000000 08000000 00000000 00000000 00000000"
            " 0000004000000000" + " 0000000000000000" * 4,
        ),
        # size=21 type=24 tag=6 fid=2 request_mask=MODE|SIZE
        (ninep.tgetattr(6, 2, 0x201), "13000000 18 0600 02000000 0102000000000000"),
        # size=11 type=120 tag=5 fid=2
        (ninep.tclunk(5, 2), "0b000000 78 0500 02000000"),
        # size=22 type=72 tag=7 dfid=0 name=".nbd" mode=0755 gid=0
        (
            ninep.tmkdir(7, 0, ".nbd", 0o755, 0),
            "19000000 48 0700 00000000 04002e6e6264 ed010000 00000000",
        ),
    ],
)
def test_encoding_matches_golden_bytes(message: bytes, expected_hex: str) -> None:
    assert message.hex() == expected_hex.replace(" ", "")


def test_rgetattr_decoding_of_golden_bytes() -> None:
    body = bytes.fromhex(
        "ff07000000000000"  # valid = P9_GETATTR_BASIC
        "00"
        "00000000"
        "d11b2c0000000000"  # qid: file, version 0, path 0x2c1bd1
        "a4810000"  # mode 0100644
        "00000000"
        "00000000"  # uid, gid
        "0100000000000000"  # nlink
        "0000000000000000"  # rdev
        "0000100000000000"  # size = 1 MiB
        "0010000000000000" + "00" * 8 * 11  # blksize 4096
        # blocks, atime/mtime/ctime/btime as sec and nsec, gen, data_version
    )
    qid, mode, size = ninep.decode_rgetattr_size(body)
    assert qid == ninep.Qid(type=0, version=0, path=0x2C1BD1) and qid.is_regular
    assert mode == 0o100644
    assert size == 1 << 20


def test_rgetattr_without_valid_size_is_a_protocol_error() -> None:
    body = bytes(ninep.RGETATTR_BODY.size)
    with pytest.raises(OSError) as caught:
        ninep.decode_rgetattr_size(body)
    assert caught.value.errno == errno.EPROTO


# ---------------------------------------------------------------------------------
# Against diod


def test_creates_directory_and_file_with_the_size(export: Export) -> None:
    assert not (export.root / ".nbd").exists()
    assert export.size("pvc-a") is None

    assert export.ensure("pvc-a", GiB) == GiB

    assert (export.root / ".nbd").is_dir()
    st = export.host_path("pvc-a").stat()
    assert st.st_size == GiB
    assert st.st_blocks == 0  # sparse: setting the size writes nothing
    assert export.size("pvc-a") == GiB


def test_second_call_is_idempotent(export: Export) -> None:
    export.ensure("pvc-a", GiB)
    before = export.host_path("pvc-a").stat()

    assert export.ensure("pvc-a", GiB) == GiB

    after = export.host_path("pvc-a").stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


@pytest.mark.parametrize(
    ("before", "asked", "expected"),
    [
        (None, 4096, ninep.ExportFile(4096, created=True)),
        (b"", 4096, ninep.ExportFile(4096, created=False)),
        (b"data", 4096, ninep.ExportFile(4096, created=False)),
        (b"x" * 8192, 4096, ninep.ExportFile(8192, created=False)),
    ],
)
def test_says_whether_it_created_the_export(
    export: Export, before: bytes | None, asked: int, expected: ninep.ExportFile
) -> None:
    if before is not None:
        export.host_path("pvc-a").parent.mkdir()
        export.host_path("pvc-a").write_bytes(before)

    assert export.prepare("pvc-a", asked) == expected
    assert export.prepare("pvc-a", asked).created is False


def test_grows_a_smaller_export_and_keeps_its_data(export: Export) -> None:
    export.ensure("pvc-a", 1 << 20)
    with export.host_path("pvc-a").open("r+b") as f:
        f.write(b"keep me")

    assert export.ensure("pvc-a", 4 << 20) == 4 << 20

    assert export.host_path("pvc-a").stat().st_size == 4 << 20
    assert export.host_path("pvc-a").read_bytes()[:7] == b"keep me"


def test_never_shrinks_and_reports_the_larger_size(export: Export) -> None:
    export.ensure("pvc-a", 4 << 20)

    assert export.ensure("pvc-a", 1 << 20) == 4 << 20

    assert export.host_path("pvc-a").stat().st_size == 4 << 20


def test_uses_an_existing_export_directory(export: Export) -> None:
    (export.root / ".nbd").mkdir()
    (export.root / ".nbd" / "other").write_bytes(b"x")

    assert export.ensure("pvc-b", 8192) == 8192
    assert export.size("other") == 1


def test_export_that_is_a_directory_is_refused(export: Export) -> None:
    export.host_path("pvc-a").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as caught:
        export.ensure("pvc-a", 4096)
    assert caught.value.filename == ".nbd/pvc-a"


def test_server_error_carries_its_errno_and_the_path(tmp_path: Path) -> None:
    # uid 65534 must be able to reach the export: a world-searchable directory in /tmp.
    root = Path(tempfile.mkdtemp(prefix="ninep-test-"))
    try:
        os.chmod(root, 0o755)
        (root / ".nbd").mkdir()
        os.chmod(root / ".nbd", 0o555)
        with diod_server(root, tmp_path / "9p.sock"):
            deadline = time.monotonic() + 5
            with ninep.NinePConnection(tmp_path / "9p.sock", label="v", deadline=deadline) as c:
                c.version()
                # diod -N lets any uid attach; as uid 65534 the read-only directory refuses.
                c.attach(0, uname="", aname=str(root), n_uname=65534)
                assert c.walk_one(0, 1, ".nbd", ".nbd") is not None
                with pytest.raises(PermissionError) as caught:
                    c.lcreate(1, "pvc-a", ninep.DOTL_RDWR | ninep.DOTL_CREATE, 0o600, 0, ".nbd/a")
    finally:
        shutil.rmtree(root)
    assert caught.value.errno == errno.EACCES
    assert caught.value.filename == ".nbd/a"
    assert "Tlcreate" in str(caught.value)


def test_wrong_attach_name_is_the_servers_errno(export: Export) -> None:
    with pytest.raises(PermissionError) as caught:
        ninep.prepare_export(export.sock, "pvc-a", 4096, aname="/not/exported", timeout=5)
    assert caught.value.errno == errno.EPERM


def test_negotiates_a_smaller_msize(export: Export) -> None:
    with ninep.NinePConnection(export.sock, label="x", deadline=time.monotonic() + 5) as conn:
        assert conn.version(8192) == 8192
        assert conn.msize == 8192


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "x\x00y", "/abs", "x" * 256, "../escape"])
def test_unsafe_export_names_are_invalid_arguments(export: Export, name: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        export.ensure(name, 4096)
    with pytest.raises(errors.InvalidArgument):
        export.size(name)
    assert not (export.root / ".nbd").exists()


@pytest.mark.parametrize("size", [0, -1, True, 2**63, 1.5])
def test_bad_sizes_are_invalid_arguments(export: Export, size: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        export.ensure("pvc-a", size)


# ---------------------------------------------------------------------------------
# No server, or a misbehaving one


def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "absent.sock"
    with pytest.raises(errors.Unavailable) as caught:
        ninep.prepare_export(sock, "pvc-a", 4096)
    assert "pvc-a" in caught.value.message and str(sock) in caught.value.message


def test_socket_without_listener_is_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "dead.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(errors.Unavailable) as caught:
        ninep.export_size(sock, "pvc-a")
    assert "not answering" in caught.value.message


def test_server_that_stopped_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    sock = tmp_path / "9p.sock"
    with diod_server(root, sock):
        assert ninep.prepare_export(sock, "pvc-a", 4096, aname=str(root)).size_bytes == 4096
    with pytest.raises(errors.Unavailable):
        ninep.prepare_export(sock, "pvc-a", 4096, aname=str(root))


def scripted_server(
    sock: Path, reply: Callable[[bytes], bytes | None], *, hang_up: bool = False
) -> threading.Thread:
    """Accepts one connection, reads one message, answers ``reply(message)`` (None:
    say nothing), then holds the connection open until the client goes away, or
    closes it at once with ``hang_up``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            size = struct.unpack("<I", conn.recv(4))[0]
            message = conn.recv(size - 4)
            answer = reply(message)
            if answer is not None:
                conn.sendall(answer)
            if not hang_up:
                conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def rversion(msize: int, version: str, tag: int = ninep.NOTAG) -> bytes:
    body = struct.pack("<IH", msize, len(version)) + version.encode()
    return ninep.encode_message(ninep.RVERSION, tag, body)


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (rversion(65536, "unknown"), "does not speak 9P2000.L"),
        (rversion(65536, "9P2000.L", tag=7), "tag 7"),
        (rversion(1024, "9P2000.L"), "msize 1024"),
        (rversion(1 << 20, "9P2000.L"), "msize 1048576"),
        (struct.pack("<IBH", 1 << 20, ninep.RVERSION, ninep.NOTAG), "reply of 1048576 bytes"),
        (ninep.encode_message(ninep.RATTACH, ninep.NOTAG, bytes(13)), "message type 105"),
    ],
)
def test_protocol_violations_are_eproto(tmp_path: Path, answer: bytes, detail: str) -> None:
    sock = tmp_path / "9p.sock"
    thread = scripted_server(sock, lambda _message: answer)
    with pytest.raises(OSError) as caught:
        ninep.prepare_export(sock, "pvc-a", 4096, timeout=5)
    assert caught.value.errno == errno.EPROTO
    assert detail in str(caught.value)
    thread.join(5)


def test_silent_server_hits_the_deadline(tmp_path: Path) -> None:
    sock = tmp_path / "9p.sock"
    thread = scripted_server(sock, lambda _message: None)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        ninep.prepare_export(sock, "pvc-a", 4096, timeout=0.3)
    assert time.monotonic() - started < 2
    assert str(sock) in caught.value.message
    thread.join(5)


def test_server_closing_mid_conversation_is_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "9p.sock"
    # Half a header, then EOF.
    thread = scripted_server(sock, lambda _message: b"\x20\x00", hang_up=True)
    with pytest.raises(errors.Unavailable) as caught:
        ninep.prepare_export(sock, "pvc-a", 4096, timeout=5)
    assert "closed the connection" in caught.value.message
    thread.join(5)


class CountingProxy:
    """Passes 9P between clients and diod, counting connections and client messages."""

    def __init__(self, public: Path, private: Path) -> None:
        self.private = str(private)
        self.connections = 0
        self.message_types: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(public))
        self.listener.listen(4)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.private)
            threading.Thread(target=self.replies, args=(server, client), daemon=True).start()
            threading.Thread(target=self.requests, args=(client, server), daemon=True).start()

    def requests(self, client: socket.socket, server: socket.socket) -> None:
        with client, server:
            while header := client.recv(4, socket.MSG_WAITALL):
                rest = client.recv(struct.unpack("<I", header)[0] - 4, socket.MSG_WAITALL)
                self.message_types.append(rest[0])
                server.sendall(header + rest)

    @staticmethod
    def replies(server: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := server.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass


def test_one_connection_and_few_messages(export: Export, tmp_path: Path) -> None:
    counted = tmp_path / "counted.sock"
    proxy = CountingProxy(counted, export.sock)
    try:
        ninep.prepare_export(counted, "pvc-a", GiB, aname=str(export.root))
        fresh = list(proxy.message_types)
        proxy.message_types.clear()
        ninep.prepare_export(counted, "pvc-a", GiB, aname=str(export.root))
        existing = list(proxy.message_types)
    finally:
        proxy.listener.close()
    assert proxy.connections == 2  # one per call
    t = ninep
    # Fresh: version, attach, walk .nbd (ENOENT), mkdir, walk .nbd, walk name (ENOENT),
    # lcreate, setattr, getattr to confirm, then the clunks in one round trip.
    assert fresh == [
        t.TVERSION, t.TATTACH, t.TWALK, t.TMKDIR, t.TWALK, t.TWALK, t.TLCREATE,
        t.TSETATTR, t.TGETATTR, t.TCLUNK, t.TCLUNK,
    ]  # fmt: skip
    # Existing and big enough: nothing is written.
    assert existing == [
        t.TVERSION, t.TATTACH, t.TWALK, t.TWALK, t.TGETATTR, t.TCLUNK, t.TCLUNK, t.TCLUNK,
    ]  # fmt: skip
