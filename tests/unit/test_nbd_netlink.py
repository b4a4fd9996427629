"""Host tests of the attach path: netlink bytes against hand-built golden layouts, parsing
of replies captured from a real kernel, and the NBD handshake against a real nbdkit."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zerofs_csi.bench.plugin import accepts, wait_until
from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.nbd.tuning import block_size_for

CAPTURE = json.loads(
    (Path(__file__).parents[1] / "privileged" / "data" / "kernel_replies.json").read_text()
)
FAMILY = CAPTURE["family_id"]

# Wire layout, written out by hand from include/uapi/linux/netlink.h and genetlink.h.
NLM_F_REQUEST_ACK = 0x1 | 0x4
NLA_F_NESTED = 0x8000


def nlattr(attr_type: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), attr_type)
    pad = b"\0" * (-len(payload) % 4)
    return header + payload + pad


def genl_message(nl_type: int, seq: int, cmd: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), nl_type, NLM_F_REQUEST_ACK, seq, 0) + body


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


# ---- golden bytes ----------------------------------------------------------------------


def test_getfamily_literal_bytes() -> None:
    assert _nbd.build_getfamily_message(1).hex() == (
        "1c00000010000500010000000000000003010000080002006e626400"
    )


def test_getfamily_layout() -> None:
    expected = genl_message(16, 7, 3, nlattr(2, b"no_such_family\0"))
    assert _nbd.build_getfamily_message(7, "no_such_family") == expected


def test_connect_layout() -> None:
    sockets = nlattr(
        7 | NLA_F_NESTED,
        nlattr(1 | NLA_F_NESTED, nlattr(1, u32(5))) + nlattr(1 | NLA_F_NESTED, nlattr(1, u32(9))),
    )
    attrs = (
        nlattr(2, u64(1 << 30))
        + nlattr(3, u64(4096))
        + nlattr(4, u64(0))
        + nlattr(8, u64(300))
        + nlattr(5, u64(0x56D))
        + nlattr(6, u64(0))
        + nlattr(10, b"pvc-123\0")
        + sockets
    )
    built = _nbd.build_nbd_message(
        FAMILY,
        42,
        _nbd.NBD_CMD_CONNECT,
        size_bytes=1 << 30,
        block_size=4096,
        timeout_s=0,
        dead_conn_timeout_s=300,
        server_flags=0x56D,
        client_flags=0,
        socket_fds=[5, 9],
        backend_id="pvc-123",
    )
    assert built == genl_message(FAMILY, 42, 1, attrs)


def test_connect_with_explicit_index_puts_index_first() -> None:
    built = _nbd.build_nbd_message(
        FAMILY, 3, _nbd.NBD_CMD_CONNECT, index=7, size_bytes=512, socket_fds=[4]
    )
    attrs = (
        nlattr(1, u32(7))
        + nlattr(2, u64(512))
        + nlattr(7 | NLA_F_NESTED, nlattr(1 | NLA_F_NESTED, nlattr(1, u32(4))))
    )
    assert built == genl_message(FAMILY, 3, 1, attrs)


def test_disconnect_layout() -> None:
    built = _nbd.build_nbd_message(FAMILY, 9, _nbd.NBD_CMD_DISCONNECT, index=3)
    assert built == genl_message(FAMILY, 9, 2, nlattr(1, u32(3)))


def test_reconfigure_layout() -> None:
    built = _nbd.build_nbd_message(
        FAMILY, 10, _nbd.NBD_CMD_RECONFIGURE, index=2, socket_fds=[11], backend_id="vol"
    )
    attrs = (
        nlattr(1, u32(2))
        + nlattr(10, b"vol\0")
        + nlattr(7 | NLA_F_NESTED, nlattr(1 | NLA_F_NESTED, nlattr(1, u32(11))))
    )
    assert built == genl_message(FAMILY, 10, 3, attrs)


def test_reconfigure_resize_layout() -> None:
    built = _nbd.build_nbd_message(
        FAMILY, 11, _nbd.NBD_CMD_RECONFIGURE, index=2, size_bytes=2 << 30, backend_id="v"
    )
    attrs = nlattr(1, u32(2)) + nlattr(2, u64(2 << 30)) + nlattr(10, b"v\0")
    assert built == genl_message(FAMILY, 11, 3, attrs)


def test_status_layouts() -> None:
    assert _nbd.build_nbd_message(FAMILY, 5, _nbd.NBD_CMD_STATUS) == genl_message(FAMILY, 5, 5, b"")
    assert _nbd.build_nbd_message(FAMILY, 6, _nbd.NBD_CMD_STATUS, index=0) == genl_message(
        FAMILY, 6, 5, nlattr(1, u32(0))
    )


@pytest.mark.parametrize(
    "name", ["getfamily_nbd", "connect", "status_one", "status_all", "disconnect"]
)
def test_requests_the_kernel_accepted_are_still_built_the_same(name: str) -> None:
    """The captured requests got a successful reply from a real kernel; the builder must
    still produce them byte for byte."""
    request = bytes.fromhex(CAPTURE["entries"][name]["request"])
    nl_type, _flags, seq, payload = _nbd.decode_messages(request)[0]
    cmd = payload[0]
    if nl_type == 16:
        assert _nbd.build_getfamily_message(seq) == request
        return
    kwargs: dict[str, object] = {}
    if name == "connect":
        kwargs = dict(
            size_bytes=64 << 20,
            block_size=4096,
            timeout_s=0,
            dead_conn_timeout_s=2,
            server_flags=0xD6D,
            client_flags=None,
            backend_id=CAPTURE["backend"],
            socket_fds=[6],
        )
    elif name in ("status_one", "disconnect"):
        kwargs = dict(index=CAPTURE["device_index"])
    rebuilt = _nbd.build_nbd_message(FAMILY, seq, cmd, **kwargs)  # type: ignore[arg-type]
    assert rebuilt == request


@pytest.mark.parametrize(
    "kwargs",
    [
        {"socket_fds": list(range(3, 3 + 17))},
        {"backend_id": "a\0b"},
        {"index": 0xFFFFFFFF},
        {"socket_fds": [-1]},
    ],
)
def test_builder_rejects_bad_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _nbd.build_nbd_message(FAMILY, 1, _nbd.NBD_CMD_CONNECT, **kwargs)  # type: ignore[arg-type]


# ---- parsing real kernel replies -------------------------------------------------------


def replies(name: str) -> list[tuple[int, int, int, bytes]]:
    out = []
    for blob in CAPTURE["entries"][name]["replies"]:
        out.extend(_nbd.decode_messages(bytes.fromhex(blob)))
    return out


def test_family_reply() -> None:
    (data, ack) = replies("getfamily_nbd")
    assert data[0] == 16 and _nbd.decode_genl_command(data[3]) == 1  # CTRL_CMD_NEWFAMILY
    family_id, groups = _nbd.decode_family(data[3])
    assert family_id == CAPTURE["family_id"]
    assert groups == {"nbd_mc_group": CAPTURE["mcast_group_id"]}
    assert ack[0] == 2 and _nbd.decode_error(ack[3], ack[1]) == (0, None)


def test_missing_family_is_enoent() -> None:
    ((nl_type, flags, _seq, payload),) = replies("getfamily_missing")
    assert nl_type == 2
    assert _nbd.decode_error(payload, flags) == (errno.ENOENT, None)


def test_connect_reply_carries_the_index() -> None:
    data, ack = replies("connect")
    assert data[0] == FAMILY and _nbd.decode_genl_command(data[3]) == _nbd.NBD_CMD_CONNECT
    assert _nbd.decode_index(data[3]) == CAPTURE["device_index"]
    assert _nbd.decode_error(ack[3], ack[1]) == (0, None)


def test_status_replies() -> None:
    one = replies("status_one")[0]
    assert _nbd.decode_device_list(one[3]) == [(CAPTURE["device_index"], True)]
    everything = _nbd.decode_device_list(replies("status_all")[0][3])
    assert len(everything) == 128  # nbds_max=128 in the VM
    assert [i for i, _ in everything] == list(range(128))
    assert dict(everything)[CAPTURE["device_index"]] is True


def test_status_split_matches_the_full_decode() -> None:
    payload = replies("status_all")[0][3]
    configured, free = _nbd.split_device_list(payload)
    everything = _nbd.decode_device_list(payload)
    assert configured == [i for i, c in everything if c]
    assert free == [i for i, c in everything if not c]
    assert CAPTURE["device_index"] in configured and len(configured) + len(free) == 128


def test_find_backend_without_nbd_devices() -> None:
    assert _nbd.find_backend([], "x") == -1
    assert _nbd.find_backend([100000], "x") == -1  # no such sysfs entry


def test_errors_and_extended_ack() -> None:
    ((_t, flags, _s, payload),) = replies("connect_without_sockets")
    assert _nbd.decode_error(payload, flags) == (errno.EINVAL, None)
    ((_t, flags, _s, payload),) = replies("status_bad_index_length")
    assert flags & 0x200  # NLM_F_ACK_TLVS
    assert _nbd.decode_error(payload, flags) == (
        errno.ERANGE,
        "Attribute failed policy validation",
    )
    ((_t, flags, _s, payload),) = replies("reconfigure_wrong_backend")
    assert _nbd.decode_error(payload, flags)[0] == errno.EINVAL


def test_link_dead_notification() -> None:
    ((nl_type, _flags, seq, payload),) = replies("link_dead")
    assert nl_type == FAMILY and seq == 0
    assert _nbd.decode_genl_command(payload) == _nbd.NBD_CMD_LINK_DEAD
    assert _nbd.decode_index(payload) == CAPTURE["device_index"]


def test_truncated_input_is_refused() -> None:
    blob = bytes.fromhex(CAPTURE["entries"]["connect"]["replies"][0])
    with pytest.raises(ValueError):
        _nbd.decode_messages(blob[:-3])
    with pytest.raises(ValueError):
        _nbd.decode_index(b"\x01\x01\x00\x00")


# ---- handshake against a real nbdkit ---------------------------------------------------

needs_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed")
needs_socat = pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")


def wait_for_path(path: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the server accepts connections (the path appears before listen())."""
    wait_until(lambda: accepts(Path(path)) or proc.poll() is not None, 10, f"a server on {path}")
    if proc.poll() is not None:
        raise RuntimeError(f"server did not start (exit {proc.poll()})")


class Nbdkit:
    def __init__(self, tmp: Path, *args: str, params: tuple[str, ...] = ()) -> None:
        self.dir = tmp / "exports"
        self.dir.mkdir(exist_ok=True)
        for name, size in (("disk1", 4 << 20), ("disk2", 1 << 20)):
            with open(self.dir / name, "wb") as f:
                f.truncate(size)
        self.sock = str(tmp / f"nbdkit-{len(list(tmp.iterdir()))}.sock")
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", self.sock, *args, "file", f"dir={self.dir}", *params],
            stderr=subprocess.DEVNULL,
        )
        wait_for_path(self.sock, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


StartNbdkit = Callable[..., Nbdkit]


@pytest.fixture
def start_nbdkit(tmp_path: Path) -> Iterator[StartNbdkit]:
    servers: list[Nbdkit] = []

    def start(*args: str, params: tuple[str, ...] = ()) -> Nbdkit:
        server = Nbdkit(tmp_path, *args, params=params)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def nbd_read(fd: int, offset: int, length: int) -> bytes:
    """One NBD_CMD_READ with a simple reply, proving the socket is in transmission."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 0xABCD, offset, length))
        header = b""
        while len(header) < 16:
            header += sock.recv(16 - len(header))
        magic, error, cookie = struct.unpack(">IIQ", header)
        assert (magic, error, cookie) == (0x67446698, 0, 0xABCD)
        data = b""
        while len(data) < length:
            data += sock.recv(length - len(data))
        return data
    finally:
        sock.close()


@needs_nbdkit
def test_go_negotiates_size_flags_and_no_zeroes(start_nbdkit: StartNbdkit, tmp_path: Path) -> None:
    server = start_nbdkit()
    with open(server.dir / "disk1", "r+b") as f:
        f.write(b"hello nbd")
    with _nbd.negotiate(server.sock, "disk1") as neg:
        assert neg.size_bytes == 4 << 20
        assert neg.used_go
        assert neg.handshake_flags & 0b11 == 0b11  # fixed newstyle, no zeroes offered
        assert neg.transmission_flags & _nbd.NBD_FLAG_HAS_FLAGS
        assert neg.transmission_flags & _nbd.NBD_FLAG_SEND_FLUSH
        (fd,) = neg.socket_fds
        sock = socket.socket(fileno=os.dup(fd))
        # The kernel's receive thread must never time out on these sockets.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == b"\0" * 16
        sock.close()
        assert nbd_read(fd, 0, 9) == b"hello nbd"


@needs_nbdkit
def test_four_connections_are_all_in_transmission(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit()
    with _nbd.negotiate(server.sock, "disk2", connections=4) as neg:
        assert len(set(neg.socket_fds)) == 4
        assert neg.can_multi_conn
        for fd in neg.socket_fds:
            assert nbd_read(fd, 512, 512) == b"\0" * 512
    assert neg.socket_fds == ()


@needs_nbdkit
def test_multi_conn_flag_follows_the_server(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit("--filter=multi-conn", params=("multi-conn-mode=disable",))
    with _nbd.negotiate(server.sock, "disk1", connections=2) as neg:
        assert not neg.can_multi_conn


@needs_nbdkit
def test_export_name_path_on_a_plain_newstyle_server(start_nbdkit: StartNbdkit) -> None:
    # --mask-handshake=0 hides FIXED_NEWSTYLE and NO_ZEROES: only EXPORT_NAME is allowed,
    # and the reply carries 124 bytes of padding that must be consumed.
    server = start_nbdkit("--mask-handshake=0")
    with _nbd.negotiate(server.sock, "disk1") as neg:
        assert not neg.used_go
        assert neg.handshake_flags == 0
        assert neg.size_bytes == 4 << 20
        assert nbd_read(neg.socket_fds[0], 0, 512) == b"\0" * 512


@needs_nbdkit
def test_go_without_no_zeroes(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit("--mask-handshake=1")
    with _nbd.negotiate(server.sock, "disk2") as neg:
        assert neg.used_go and neg.handshake_flags == 1
        assert nbd_read(neg.socket_fds[0], 0, 512) == b"\0" * 512


@needs_nbdkit
def test_flags_sent_ahead_save_a_round_trip(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit()
    offered = _nbd.negotiate(server.sock, "disk1").handshake_flags
    handshake = _nbd.Handshake(server.sock, "disk1", 2, 5.0, offered)
    with handshake.finish() as neg:
        assert neg.used_go and neg.size_bytes == 4 << 20
        for fd in neg.socket_fds:
            assert nbd_read(fd, 0, 512) == b"\0" * 512
    with pytest.raises(ValueError):
        handshake.finish()


@needs_nbdkit
def test_flags_sent_ahead_that_do_not_match_fail_with_eagain(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit("--mask-handshake=1")  # fixed newstyle only, no NO_ZEROES
    with pytest.raises(_nbd.HandshakeError) as info:
        _nbd.negotiate(server.sock, "disk1", assume_handshake_flags=0b11)
    assert info.value.errno == errno.EAGAIN
    with _nbd.negotiate(server.sock, "disk1") as neg:
        assert neg.handshake_flags == 1


@needs_nbdkit
def test_an_abandoned_handshake_closes_its_sockets(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit()
    before = len(os.listdir("/proc/self/fd"))
    handshake = _nbd.Handshake(server.sock, "disk1", 3)
    assert len(os.listdir("/proc/self/fd")) == before + 3
    handshake.close()
    handshake.close()
    assert len(os.listdir("/proc/self/fd")) == before


@needs_nbdkit
def test_unknown_export(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit()
    with pytest.raises(_nbd.ExportNotFound) as info:
        _nbd.negotiate(server.sock, "missing")
    assert info.value.errno == errno.ENOENT
    assert "missing" in str(info.value)


@needs_nbdkit
def test_unknown_export_on_the_export_name_path(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit("--mask-handshake=0")
    with pytest.raises(_nbd.ExportNotFound):
        _nbd.negotiate(server.sock, "missing")


@needs_nbdkit
def test_tls_required(start_nbdkit: StartNbdkit, tmp_path: Path) -> None:
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "ab" * 16 + "\n")
    server = start_nbdkit("--tls=require", f"--tls-psk={psk}")
    with pytest.raises(_nbd.HandshakeError) as info:
        _nbd.negotiate(server.sock, "disk1")
    assert info.value.errno == errno.EOPNOTSUPP
    assert "requires TLS" in str(info.value)


@needs_nbdkit
def test_list_exports(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit()
    assert sorted(_nbd.list_exports(server.sock)) == [("disk1", ""), ("disk2", "")]


@needs_nbdkit
def test_tcp_with_nodelay(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    export = tmp_path / "disk"
    export.write_bytes(b"\0" * 65536)
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(export)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with _nbd.negotiate(("127.0.0.1", port), "") as neg:
            assert neg.size_bytes == 65536
            sock = socket.socket(fileno=os.dup(neg.socket_fds[0]))
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            sock.close()
    finally:
        proc.terminate()
        proc.wait()


def test_no_server_at_the_path(tmp_path: Path) -> None:
    with pytest.raises(_nbd.HandshakeError) as info:
        _nbd.negotiate(str(tmp_path / "absent.sock"), "x")
    assert info.value.errno == errno.ENOENT
    assert "is the server running" in str(info.value)


@needs_socat
def test_bad_magic_from_a_non_nbd_server(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    proc = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{path},fork", "SYSTEM:'printf HTTP/1.0-400-Bad-Request.....'"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(path, proc)
        with pytest.raises(_nbd.HandshakeError) as info:
            _nbd.negotiate(path, "x")
        assert info.value.errno == errno.EPROTO
        assert "bad magic" in str(info.value)
    finally:
        proc.terminate()
        proc.wait()


@needs_socat
def test_short_read_when_the_server_closes(tmp_path: Path) -> None:
    path = str(tmp_path / "closer.sock")
    proc = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{path},fork", "SYSTEM:'printf NBDMAGIC'"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(path, proc)
        with pytest.raises(_nbd.HandshakeError) as info:
            _nbd.negotiate(path, "x")
        assert info.value.errno == errno.ECONNRESET
        assert "short read" in str(info.value)
    finally:
        proc.terminate()
        proc.wait()


@needs_socat
def test_silent_server_times_out_with_the_gil_released(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    proc = subprocess.Popen(
        ["socat", f"UNIX-LISTEN:{path},fork", "SYSTEM:'sleep 5'"], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_path(path, proc)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                _nbd.negotiate(path, "x", timeout_s=0.5)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        started = time.monotonic()
        worker.start()
        spins = 0
        while worker.is_alive():
            spins += 1
        elapsed = time.monotonic() - started
        assert spins > 1000  # this thread kept running while the handshake waited
        assert 0.4 < elapsed < 3
        assert isinstance(errors[0], _nbd.HandshakeError)
        assert errors[0].errno == errno.ETIMEDOUT
    finally:
        proc.terminate()
        proc.wait()


def test_errors_are_oserrors() -> None:
    for cls in (
        _nbd.NbdModuleNotLoaded,
        _nbd.NbdPermissionError,
        _nbd.DeviceBusy,
        _nbd.NotOwner,
        _nbd.DeviceNotReady,
        _nbd.NetlinkError,
        _nbd.HandshakeError,
        _nbd.ExportNotFound,
    ):
        assert issubclass(cls, OSError)
    exc = _nbd.ExportNotFound(errno.ENOENT, "no export")
    assert exc.errno == errno.ENOENT and exc.strerror == "no export"


def test_netlink_family_lookup_without_the_nbd_module() -> None:
    """The host kernel has no nbd module: the lookup must say so and how to fix it."""
    if os.path.exists("/sys/module/nbd"):
        pytest.skip("the nbd module is loaded here")
    with pytest.raises(_nbd.NbdModuleNotLoaded) as info:
        _nbd.NbdNetlink()
    assert info.value.errno == errno.ENOENT
    assert "modprobe nbd" in str(info.value)


# ---- facade checks that need no kernel -----------------------------------------------


@pytest.mark.parametrize(
    ("backend", "connections", "block_size", "timeouts"),
    [
        ("", 1, 4096, (0, 0)),
        ("a\nb", 1, 4096, (0, 0)),
        ("ok", 0, 4096, (0, 0)),
        ("ok", 17, 4096, (0, 0)),
        ("ok", 1, 8192, (0, 0)),
        ("ok", 1, 1000, (0, 0)),
        ("ok", 1, 4096, (-1, 0)),
    ],
)
def test_attach_rejects_bad_arguments_before_any_io(
    backend: str, connections: int, block_size: int, timeouts: tuple[int, int]
) -> None:
    attacher = nbd.NbdAttacher()
    with pytest.raises(ValueError):
        attacher.attach(
            "/nonexistent.sock",
            "e",
            backend,
            connections=connections,
            block_size=block_size,
            io_timeout_s=timeouts[0],
            dead_conn_timeout_s=timeouts[1],
        )


@needs_nbdkit
def test_block_size_follows_the_server_minimum(start_nbdkit: StartNbdkit) -> None:
    server = start_nbdkit("--filter=blocksize-policy", params=("blocksize-minimum=2048",))
    with _nbd.negotiate(server.sock, "disk1") as neg:
        assert neg.min_block_size == 2048
        assert block_size_for(512, neg) == 2048
        assert block_size_for(4096, neg) == 4096


def test_timeout_defaults_suit_a_restarting_server() -> None:
    # Long enough for a ZeroFS restart plus a node plugin restart.
    assert nbd.DEFAULT_DEAD_CONN_TIMEOUT_S >= 120
    # One connection by default, the only count for which the kernel has a "never
    # abandon a request" mode (TIMEOUT 0); several keep a finite timeout.
    assert nbd.DEFAULT_CONNECTIONS == 1
    assert nbd.io_timeout_for(1) == 0
    assert 0 < nbd.io_timeout_for(4) <= nbd.DEFAULT_DEAD_CONN_TIMEOUT_S
