"""Start and stop the real servers the tests talk to, and look at processes in /proc."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs-standin"


def load_standin() -> ModuleType:
    """tools/zerofs_standin.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "zerofs_standin", REPO / "tools" / "zerofs_standin.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# NBD protocol (NBD's doc/proto.md): the newstyle greeting, client flags and options.
NBD_MAGIC = b"NBDMAGIC"
NBD_IHAVEOPT = 0x49484156454F5054
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_REP_ACK = 1
NBD_REP_SERVER = 2


def require_tool(name: str) -> str:
    """The path of a server binary; fails (not skips) when it is missing, because
    tools/bootstrap.sh installs it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: run `make bootstrap` (tools/host-packages.txt)")
    return path


def wait_for_socket(path: Path, timeout: float = 10.0) -> None:
    """Until something accepts connections on the unix socket ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {path} after {timeout}s") from None
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def diod_server(export_dir: Path, socket_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """diod serving ``export_dir`` over 9P2000.L on the unix socket ``socket_path``.

    diod listens on a unix socket itself (``-l /path``); clients must attach with
    aname = ``export_dir``. ``-n`` (no auth) and ``-N`` (no user database) let uid 0
    attach; a non-root diod maps every user to itself (``-S``).
    """
    diod = require_tool("diod")
    argv = [diod, "-f", "-n", "-N", "-e", str(export_dir), "-l", str(socket_path)]
    argv += ["-L", "stderr"]
    if os.geteuid() != 0:
        argv.append("-S")
    # diod raises its own core limit: a crash dumps beside its socket, not in the work tree.
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=socket_path.parent
    )
    try:
        wait_for_socket(socket_path)
        yield process
    finally:
        stop_process(process)
        if process.stderr is not None:
            process.stderr.close()


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the NBD server closed the connection")
        data += chunk
    return data


def nbd_list_exports(socket_path: Path, timeout: float = 5.0) -> tuple[int, list[str]]:
    """Fixed-newstyle handshake, NBD_OPT_LIST, NBD_OPT_ABORT.

    Returns the server's handshake flags and the export names it lists.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        magic, opt_magic, flags = struct.unpack(">8sQH", recv_exact(sock, 18))
        if magic != NBD_MAGIC or opt_magic != NBD_IHAVEOPT:
            raise AssertionError(f"not an NBD newstyle greeting: {magic!r} {opt_magic:#x}")
        sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        sock.sendall(struct.pack(">QII", NBD_IHAVEOPT, NBD_OPT_LIST, 0))
        names = []
        while True:
            reply_magic, option, reply, length = struct.unpack(">QIII", recv_exact(sock, 20))
            assert reply_magic == NBD_OPT_REPLY_MAGIC and option == NBD_OPT_LIST
            payload = recv_exact(sock, length)
            if reply == NBD_REP_ACK:
                break
            assert reply == NBD_REP_SERVER, f"unexpected NBD reply {reply:#x}"
            (name_length,) = struct.unpack(">I", payload[:4])
            names.append(payload[4 : 4 + name_length].decode())
        sock.sendall(struct.pack(">QII", NBD_IHAVEOPT, NBD_OPT_ABORT, 0))
        return flags, names


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onward), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def session_members(session_id: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``session_id``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        # Field 6 of stat is the session id; fields[] starts at field 3.
        if fields is not None and fields[0] != "Z" and int(fields[3]) == session_id:
            members.append(int(entry.name))
    return members


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


# NBD transmission phase (NBD's doc/proto.md).
NBD_OPT_GO = 7
NBD_REP_INFO = 3
NBD_INFO_EXPORT = 0
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_CAN_MULTI_CONN = 1 << 8


class NbdRefused(ConnectionError):
    """The server answered NBD_OPT_GO with an error reply."""

    def __init__(self, reply: int, payload: bytes) -> None:
        super().__init__(f"NBD_OPT_GO refused: reply {reply:#x} {payload!r}")
        self.reply = reply


class NbdClient:
    """A minimal fixed-newstyle NBD client: NBD_OPT_GO, then read/write/zero/flush."""

    def __init__(self, socket_path: Path, export: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(socket_path))
        self._handle = 0
        magic, opt_magic, _flags = struct.unpack(">8sQH", recv_exact(self._sock, 18))
        assert magic == NBD_MAGIC and opt_magic == NBD_IHAVEOPT
        self._sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", NBD_IHAVEOPT, NBD_OPT_GO, len(data)) + data)
        self.size = -1
        self.flags = 0
        while True:
            reply_magic, option, reply, length = struct.unpack(">QIII", recv_exact(self._sock, 20))
            assert reply_magic == NBD_OPT_REPLY_MAGIC and option == NBD_OPT_GO
            payload = recv_exact(self._sock, length)
            if reply == NBD_REP_ACK:
                break
            if reply != NBD_REP_INFO:
                self._sock.close()
                raise NbdRefused(reply, payload)
            (info_type,) = struct.unpack(">H", payload[:2])
            if info_type == NBD_INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._request(NBD_CMD_DISC, 0, 0, 0)
        self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(
        self, command: int, flags: int, offset: int, length: int, data: bytes = b""
    ) -> int:
        self._handle += 1
        header = struct.pack(
            ">IHHQQI", NBD_REQUEST_MAGIC, flags, command, self._handle, offset, length
        )
        self._sock.sendall(header + data)
        return self._handle

    def _reply(self, handle: int, length: int = 0) -> bytes:
        magic, error, got = struct.unpack(">IIQ", recv_exact(self._sock, 16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC and got == handle
        if error:
            raise OSError(error, f"NBD request failed with error {error}")
        return recv_exact(self._sock, length) if length else b""

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = NBD_CMD_FLAG_FUA if fua else 0
        self._reply(self._request(NBD_CMD_WRITE, flags, offset, len(data), data))

    def zero(self, offset: int, length: int, *, may_trim: bool = True) -> None:
        """NBD_CMD_WRITE_ZEROES; without NO_HOLE, as the kernel sends it for a zeroout
        that may unmap, the range must still read back as zeroes."""
        flags = 0 if may_trim else NBD_CMD_FLAG_NO_HOLE
        self._reply(self._request(NBD_CMD_WRITE_ZEROES, flags, offset, length))

    def read(self, offset: int, length: int) -> bytes:
        return self._reply(self._request(NBD_CMD_READ, 0, offset, length), length)

    def flush(self) -> None:
        self._reply(self._request(NBD_CMD_FLUSH, 0, 0, 0))


def write_standin_config(
    path: Path,
    *,
    storage_dir: Path,
    nbd_socket: Path,
    ninep_socket: Path,
    cache_dir: Path,
    password: str = "${STANDIN_TEST_PASSWORD}",
) -> Path:
    path.write_text(
        "[cache]\n"
        f'dir = "{cache_dir}"\n'
        "disk_size_gb = 1.0\n\n"
        "[storage]\n"
        f'url = "file://{storage_dir}"\n'
        f'encryption_password = "{password}"\n\n'
        "[servers.nbd]\n"
        f'unix_socket = "{nbd_socket}"\n\n'
        "[servers.ninep]\n"
        f'unix_socket = "{ninep_socket}"\n'
    )
    return path
