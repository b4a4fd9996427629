"""The NBD server and the free devices the attach-path benchmarks share."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from zerofs_csi.nbd import _nbd

EXPORT = "bench"
EXPORT_SIZE = "1G"
SERVER_THREADS = 1


@contextmanager
def nbdkit_memory(directory: str, threads: int = SERVER_THREADS) -> Iterator[str]:
    """One nbdkit memory server on a unix socket for the whole run.

    ``threads`` is nbdkit's worker threads per connection. Its default (16) makes every
    new connection start 16 threads, which under TCG turns the handshake into ~6 ms of
    server time; ZeroFS serves connections on a fixed async runtime, so 1 is closer to
    what a real attach waits for. Every contender uses the same server."""
    if shutil.which("nbdkit") is None:
        raise SystemExit("nbdkit is not installed (apt-get install nbdkit)")
    sock = os.path.join(directory, "bench.sock")
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", sock, f"--threads={threads}", "memory", EXPORT_SIZE],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(sock)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("nbdkit did not start") from None
            time.sleep(0.01)
        yield sock
    finally:
        proc.terminate()
        proc.wait()


def free_device(netlink: _nbd.NbdNetlink) -> str:
    """A free /dev/nbdX for nbd-client: the first one without a pid, as the Go driver
    scans for it, skipping devices something holds open (udev probing one makes a named
    CONNECT fail with EBUSY)."""
    for index, configured in netlink.status():
        if not configured and _nbd.read_sysfs(index, "pid") is None:
            return f"/dev/nbd{index}"
    raise SystemExit("no free NBD device")
