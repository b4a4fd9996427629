"""Start and stop the real servers the tests talk to, and look at processes in /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs-standin"

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
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(socket_path)
        yield process
    finally:
        stop_process(process)
        if process.stderr is not None:
            process.stderr.close()


def _recv_exact(sock: socket.socket, count: int) -> bytes:
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
        magic, opt_magic, flags = struct.unpack(">8sQH", _recv_exact(sock, 18))
        if magic != NBD_MAGIC or opt_magic != NBD_IHAVEOPT:
            raise AssertionError(f"not an NBD newstyle greeting: {magic!r} {opt_magic:#x}")
        sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        sock.sendall(struct.pack(">QII", NBD_IHAVEOPT, NBD_OPT_LIST, 0))
        names = []
        while True:
            reply_magic, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20))
            assert reply_magic == NBD_OPT_REPLY_MAGIC and option == NBD_OPT_LIST
            payload = _recv_exact(sock, length)
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
