"""The attach benchmark: ours (in-process netlink) against exec'd ``nbd-client`` and a bare
netlink CONNECT, on one nbdkit server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from zerofs_csi.bench.devices import EXPORT, nbd_client_attach, nbdkit_memory
from zerofs_csi.bench.measure import Benchmark, Comparison, Timer
from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd


def bench_attach(cycles: int, warmup: int, server_threads: int) -> list[Comparison]:
    """Attach and detach: ours (in-process netlink) against exec'd ``nbd-client`` (its
    default netlink mode) and against a bare netlink CONNECT on negotiated sockets."""
    if shutil.which("nbd-client") is None:
        raise SystemExit("nbd-client is not installed (apt-get install nbd-client)")
    ours_attach: list[float] = []
    ours_detach: list[float] = []
    client_attach: list[float] = []
    client_detach: list[float] = []
    bare_connect: list[float] = []
    attacher = nbd.NbdAttacher()
    netlink = _nbd.NbdNetlink()
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp, nbdkit_memory(tmp, server_threads) as sock:

        def ours(i: int, record: bool) -> None:
            backend = f"bench-{os.getpid()}-{i}"
            with timer.measure():
                device = attacher.attach(sock, EXPORT, backend, connections=1)
            if record:
                ours_attach.append(timer.ms)
            with timer.measure():
                attacher.detach(device.index, backend)
            if record:
                ours_detach.append(timer.ms)

        def client(i: int, record: bool) -> None:
            device, attach_ms = nbd_client_attach(netlink, sock)
            if record:
                client_attach.append(attach_ms)
            with timer.measure():
                subprocess.run(
                    ["nbd-client", "-d", device],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if record:
                client_detach.append(timer.ms)

        def bare(i: int, record: bool) -> None:
            # The very CONNECT our attach sends (same attributes, a backend id included),
            # on sockets negotiated beforehand: what the kernel itself takes.
            with _nbd.negotiate(sock, EXPORT) as negotiated, timer.measure():
                index = netlink.connect(
                    negotiated.socket_fds,
                    negotiated.size_bytes,
                    block_size=nbd.DEFAULT_BLOCK_SIZE,
                    server_flags=negotiated.transmission_flags,
                    timeout_s=nbd.io_timeout_for(1),
                    dead_conn_timeout_s=nbd.DEFAULT_DEAD_CONN_TIMEOUT_S,
                    backend_id=f"bench-bare-{os.getpid()}-{i}",
                )
            if record:
                bare_connect.append(timer.ms)
            netlink.disconnect(index)

        contenders: list[Callable[[int, bool], None]] = [ours, client, bare]
        for i in range(warmup + cycles):
            # Rotate the order so that no contender always follows the same one.
            shift = i % len(contenders)
            for run in contenders[shift:] + contenders[:shift]:
                run(i, i >= warmup)
    attacher.close()
    netlink.close()
    return [
        Comparison("attach", "ms", ours_attach, "nbd-client", client_attach),
        Comparison("detach", "ms", ours_detach, "nbd-client -d", client_detach),
        Comparison("attach_vs_bare_connect", "ms", ours_attach, "bare CONNECT", bare_connect),
    ]


BENCHMARKS: dict[str, Benchmark] = {
    "attach": lambda run: bench_attach(run.cycles, run.warmup, run.server_threads),
}
