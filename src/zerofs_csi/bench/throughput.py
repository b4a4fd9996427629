"""Write throughput through a device attached our way against one attached by nbd-client.

Ours is attached as the node plugin attaches (``NodeAttacher``: several connections when
the server offers multi-conn, the driver's block size and timeouts); the baseline is
``nbd-client -unix SOCK -N EXPORT /dev/nbdX`` with its defaults. Both devices serve the
same export of one nbdkit memory server (so the server and its storage are the same)
and are attached for the whole run; fio runs alternate between them: sequential writes
(1 MiB blocks) and 4 KiB random writes, direct I/O, libaio, two jobs of queue depth 16
(one per vCPU, so that more than one hardware queue is used where there are several).
Figures in MiB/s: a ratio above 1 means ours is faster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from zerofs_csi.bench.devices import EXPORT, free_device, nbdkit_memory
from zerofs_csi.bench.measure import Benchmark, Comparison
from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.node.attach import NodeAttacher

FIO_SIZE = "256M"
RUN_SECONDS = 4
WORKLOADS = {
    "write_seq": ("write", "1M"),
    "write_rand_4k": ("randwrite", "4k"),
}


def fio_mib_per_s(device: str, rw: str, block_size: str) -> float:
    done = subprocess.run(
        [
            "fio",
            "--name=throughput",
            f"--filename={device}",
            f"--rw={rw}",
            f"--bs={block_size}",
            f"--size={FIO_SIZE}",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--numjobs=2",
            "--offset_increment=128M",
            "--group_reporting",
            "--time_based",
            f"--runtime={RUN_SECONDS}",
            "--output-format=json",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS * 30 + 120,
    )
    if done.returncode != 0:
        raise SystemExit(f"fio on {device} failed: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout[done.stdout.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"fio on {device}: error {job['error']}")
    return float(job["write"]["bw_bytes"]) / (1 << 20)


def bench_throughput(cycles: int, warmup: int, server_threads: int) -> list[Comparison]:
    for tool in ("fio", "nbd-client", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {tool})")
    attacher = nbd.NbdAttacher()
    netlink = _nbd.NbdNetlink()
    ours: dict[str, list[float]] = {name: [] for name in WORKLOADS}
    client: dict[str, list[float]] = {name: [] for name in WORKLOADS}
    backend = f"bench-throughput-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp, nbdkit_memory(tmp, server_threads) as sock:
        device = NodeAttacher(attacher).attach(sock, EXPORT, backend)
        client_device = free_device(netlink)
        subprocess.run(
            ["nbd-client", "-unix", sock, "-N", EXPORT, client_device],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for i in range(warmup + cycles):
                for name, (rw, block_size) in WORKLOADS.items():
                    pair = [(device.path, ours), (client_device, client)]
                    if i % 2:
                        pair.reverse()
                    for path, samples in pair:
                        rate = fio_mib_per_s(path, rw, block_size)
                        if i >= warmup:
                            samples[name].append(rate)
        finally:
            subprocess.run(["nbd-client", "-d", client_device], stdout=subprocess.DEVNULL)
            attacher.detach(device.index, backend)
            attacher.close()
            netlink.close()
    return [Comparison(name, "MiB/s", ours[name], "nbd-client", client[name]) for name in WORKLOADS]


BENCHMARKS: dict[str, Benchmark] = {
    "throughput": lambda run: bench_throughput(run.cycles, run.warmup, run.server_threads),
}
