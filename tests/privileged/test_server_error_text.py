"""An NBD server's error reply reaches the CO as one printable line, in the gRPC status
and in the Event.

The volume server is a scripted NBD server that the plugin starts as its ZeroFS command:
it greets as the protocol says (NBD's doc/proto.md, "Fixed newstyle negotiation") and
refuses NBD_OPT_GO with NBD_REP_ERR_POLICY and a message of ANSI colour codes, a
terminal title sequence and a newline followed by a forged log line.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_server_error_text.py
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import MiB, PluginProcess, create_volume, stop_plugin

pytestmark = pytest.mark.privileged

SERVER = """#!{python}
import os, socket, struct, sys, threading, tomllib

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_ABORT, OPT_GO = 2, 7
REP_ERR_UNSUP, REP_ERR_POLICY = (1 << 31) + 1, (1 << 31) + 2
MESSAGE = {message!r}

with open(sys.argv[sys.argv.index("-c") + 1], "rb") as f:
    path = tomllib.load(f)["servers"]["nbd"]["unix_socket"]


def recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError
        data += chunk
    return data


def serve(conn):
    with conn:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))  # FIXED_NEWSTYLE, NO_ZEROES
        try:
            recv_exact(conn, 4)
            while True:
                _magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
                recv_exact(conn, length)
                if option == OPT_ABORT:
                    return
                reply, text = (REP_ERR_UNSUP, b"")
                if option == OPT_GO:
                    reply, text = (REP_ERR_POLICY, MESSAGE)
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, reply, len(text)) + text)
        except ConnectionError:
            return


if os.path.exists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(16)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
MESSAGE = b"\x1b[31mdenied\x1b[0m\nI0101 12:00:00 plugin: volume staged\r\n\x1b]0;pwned\x07"
ESCAPED = "\\x1b[31mdenied\\x1b[0m\\nI0101 12:00:00 plugin: volume staged\\r\\n\\x1b]0;pwned\\x07"


@pytest.fixture
def refusing_plugin(tmp_path: Path) -> Iterator[PluginProcess]:
    server = tmp_path / "refusing-nbd-server"
    server.write_text(SERVER.format(python=sys.executable, message=MESSAGE))
    server.chmod(0o755)
    process = PluginProcess(tmp_path, zerofs_command=str(server))
    process.start()
    yield process
    stop_plugin(process)


def test_an_nbd_error_reply_reaches_the_co_as_one_printable_line(
    refusing_plugin: PluginProcess,
) -> None:
    plugin = refusing_plugin
    volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=128 * MiB)
    with pytest.raises(grpc.RpcError) as failed:
        volume.stage(timeout=120)
    details = failed.value.details()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, details
    assert all(c.isprintable() for c in details), repr(details)
    assert details.endswith(f"refused export {volume.volume_id!r} by policy: {ESCAPED}")

    # With --backend local the Event is a log line, and stays one.
    events = [
        line
        for line in plugin.log_path.read_text().splitlines()
        if "zerofs_csi.observability.events: event:" in line
    ]
    assert events and all(f"by policy: {ESCAPED} [volume_id=" in line for line in events), events
