"""Capture real kernel netlink replies for the host parse tests.

Run as root where the nbd module is loaded (the microVM):
    python3 tests/vm/runner.py --timeout 300 -- \
        .venv/bin/python tests/privileged/data/capture_kernel_replies.py
It writes kernel_replies.json next to itself: each entry holds the request this module
built and every raw reply message the kernel sent for it, in hex.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from zerofs_csi.nbd import _nbd

OUT = Path(__file__).with_name("kernel_replies.json")
BACKEND = "capture-backend"


def start_nbdkit(sock: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", "64M"])
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise RuntimeError("nbdkit did not start")
        time.sleep(0.01)
    return proc


def main() -> None:
    entries: dict[str, dict[str, object]] = {}
    nl = _nbd.NbdNetlink()
    seq = 1000

    def record(name: str, request: bytes) -> list[bytes]:
        replies = nl.transact(request)
        entries[name] = {"request": request.hex(), "replies": [r.hex() for r in replies]}
        return replies

    seq += 1
    record("getfamily_nbd", _nbd.build_getfamily_message(seq))
    seq += 1
    record("getfamily_missing", _nbd.build_getfamily_message(seq, "no_such_family"))

    listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    listener.bind((0, 0))
    listener.setsockopt(270, 1, nl.mcast_group_id)

    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        server = start_nbdkit(sock)
        neg = _nbd.negotiate(sock, "")
        seq += 1
        replies = record(
            "connect",
            _nbd.build_nbd_message(
                nl.family_id,
                seq,
                _nbd.NBD_CMD_CONNECT,
                size_bytes=neg.size_bytes,
                block_size=4096,
                server_flags=neg.transmission_flags,
                timeout_s=0,
                dead_conn_timeout_s=2,
                backend_id=BACKEND,
                socket_fds=neg.socket_fds,
            ),
        )
        neg.close()
        index = _nbd.decode_index(_nbd.decode_messages(replies[0])[0][3])
        seq += 1
        record(
            "status_one",
            _nbd.build_nbd_message(nl.family_id, seq, _nbd.NBD_CMD_STATUS, index=index),
        )
        seq += 1
        record("status_all", _nbd.build_nbd_message(nl.family_id, seq, _nbd.NBD_CMD_STATUS))
        seq += 1
        record(
            "connect_without_sockets",
            _nbd.build_nbd_message(nl.family_id, seq, _nbd.NBD_CMD_CONNECT, size_bytes=1 << 20),
        )
        # An INDEX attribute two bytes long fails the kernel's policy check (extended ack).
        seq += 1
        bad = bytearray(_nbd.build_nbd_message(nl.family_id, seq, _nbd.NBD_CMD_STATUS, index=0))
        bad[20:22] = (6).to_bytes(2, "little")
        record("status_bad_index_length", bytes(bad))
        seq += 1
        record(
            "reconfigure_wrong_backend",
            _nbd.build_nbd_message(
                nl.family_id, seq, _nbd.NBD_CMD_RECONFIGURE, index=index, backend_id="other"
            ),
        )

        # Killing the server makes the kernel mark the link dead and multicast LINK_DEAD.
        server.send_signal(signal.SIGKILL)
        server.wait()
        listener.settimeout(20)
        entries["link_dead"] = {"request": "", "replies": [listener.recv(65536).hex()]}

        seq += 1
        record(
            "disconnect",
            _nbd.build_nbd_message(nl.family_id, seq, _nbd.NBD_CMD_DISCONNECT, index=index),
        )
    OUT.write_text(
        json.dumps(
            {
                "kernel": platform.release(),
                "how": "tests/privileged/data/capture_kernel_replies.py in the microVM",
                "family_id": nl.family_id,
                "mcast_group_id": nl.mcast_group_id,
                "device_index": index,
                "backend": BACKEND,
                "entries": entries,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
