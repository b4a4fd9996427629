"""The NBD server and the free devices the attach-path benchmarks share."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zerofs_csi.bench.measure import Timer
from zerofs_csi.bench.plugin import accepts, wait_until
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
        wait_until(
            lambda: accepts(Path(sock)) or proc.poll() is not None, 30, "nbdkit to listen", 0.01
        )
        if proc.poll() is not None:
            raise SystemExit("nbdkit did not start")
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


def nbd_client_attach(netlink: _nbd.NbdNetlink, sock: str) -> tuple[str, float]:
    """``nbd-client`` with its defaults on a free device; (device, ms). A device udev
    opened between the scan and the connect makes it fail (EBUSY): such attempts are
    retried and not counted."""
    timer = Timer()
    for _attempt in range(5):
        device = free_device(netlink)
        with timer.measure():
            done = subprocess.run(
                ["nbd-client", "-unix", sock, "-N", EXPORT, device],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if done.returncode == 0:
            return device, timer.ms
    raise SystemExit("nbd-client failed five times in a row")
