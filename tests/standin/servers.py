"""Start and stop the real servers the tests talk to, and look at processes in /proc.

The NBD handshake and /proc/PID/stat are read by the driver's own code (the extension's
greet, list_exports and negotiate; zerofs_csi.host.procfs); the NBD client here speaks
only the transmission phase, over the socket the extension negotiated.
"""

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

from zerofs_csi.host.procfs import stat_fields
from zerofs_csi.nbd import _nbd
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.volume.secrets import VolumeSecrets

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
    """The server's handshake flags (its greeting) and the export names NBD_OPT_LIST gives."""
    flags = _nbd.greet(str(socket_path), timeout)
    return flags, [name for name, _description in _nbd.list_exports(str(socket_path), timeout)]


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def session_members(session_id: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``session_id``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
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
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1


class NbdClient:
    """A minimal NBD client: the extension's handshake (NBD_OPT_GO), then
    read/write/zero/flush. An unknown export raises the extension's ExportNotFound."""

    def __init__(self, socket_path: Path, export: str, timeout: float = 10.0) -> None:
        with _nbd.negotiate(str(socket_path), export, timeout_s=timeout) as negotiated:
            (fd,) = negotiated.socket_fds
            self._sock = socket.socket(fileno=os.dup(fd))
            self.size = negotiated.size_bytes
            self.flags = negotiated.transmission_flags
        self._sock.settimeout(timeout)
        self._handle = 0

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
    rpc_socket: Path | None = None,
) -> Path:
    text = (
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
    if rpc_socket is not None:
        text += f'\n[servers.rpc]\nunix_socket = "{rpc_socket}"\n'
    path.write_text(text)
    return path


def start_volume_server(
    sockets: ServerSockets,
    storage: Path,
    volume_id: str,
    secrets: VolumeSecrets,
    size: int,
    work_dir: Path,
) -> subprocess.Popen[bytes]:
    """The stand-in serving ``volume_id`` of file:// ``storage`` as the driver runs a
    staged volume's server: its config rendered by the driver (in ``work_dir``), its NBD,
    9P and admin sockets at ``sockets``; returns once all three listen and the export of
    ``size`` bytes exists."""
    from zerofs_csi.servers import ninep
    from zerofs_csi.servers.zerofs_config import render_zerofs_config
    from zerofs_csi.volume.settings import parse_volume_settings

    sockets.directory.mkdir(parents=True)
    rendered = render_zerofs_config(
        parse_volume_settings({"storageUrl": f"file://{storage}"}),
        volume_id,
        secrets,
        cache_dir=str(work_dir / f"cache-{volume_id}"),
        nbd_socket=str(sockets.nbd),
        ninep_socket=str(sockets.ninep),
        rpc_socket=str(sockets.admin),
    )
    config = work_dir / f"{volume_id}.toml"
    config.write_text(rendered.toml_text)
    process = subprocess.Popen(
        [str(STANDIN), "run", "-c", str(config)],
        env={"PATH": "/usr/bin:/bin", **rendered.secret_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_socket(sockets.nbd, timeout=30)
    # The stand-in starts its admin service on a thread of its own, after NBD.
    wait_for_socket(sockets.admin, timeout=30)
    ninep.prepare_export(sockets.ninep, volume_id, size)
    return process
