"""Benchmark: what ``syncWrites`` costs a writer, against the same volume without it.

``syncWrites`` (ZeroFS's ``[lsm] sync_writes``) makes the server store each write before
it answers it, so that a killed server is a pause rather than lost writes (README,
"Faults"). Without it the server answers from memory and stores at flushes. One plugin
(local backend, the run's server and storage) stages two block volumes, one with each
setting, and fio alternates between their devices: 1 MiB sequential and 4 KiB random
direct writes, as in the throughput benchmark. Ours: the syncWrites volume; baseline:
the default one. Figures in MiB/s: a ratio below 1 is the setting's cost.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from zerofs_csi.bench.measure import Benchmark, Comparison, RunOptions
from zerofs_csi.bench.plugin import PluginProcess, create_volume, running_plugin
from zerofs_csi.bench.throughput import WORKLOADS, fio_mib_per_s

MiB = 1 << 20
# Twice fio's two jobs' 128 MiB offsets, so that each writes its own range.
VOLUME_SIZE = 512 * MiB


def bench_sync_writes(run: RunOptions) -> list[Comparison]:
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    samples: dict[tuple[str, bool], list[float]] = {
        (workload, synced): [] for workload in WORKLOADS for synced in (True, False)
    }
    with tempfile.TemporaryDirectory(prefix="zerofs-bench-sync-") as tmp:
        workdir = Path(tmp)
        plugin = PluginProcess(
            workdir, zerofs_command=run.zerofs_command, s3=run.s3, log_level="warning"
        )
        with running_plugin(plugin):
            devices: dict[bool, str] = {}
            for synced in (True, False):
                volume = create_volume(
                    plugin,
                    workdir,
                    size=VOLUME_SIZE,
                    block=True,
                    name=f"bench-sync-writes-{str(synced).lower()}",
                    parameters={"syncWrites": str(synced).lower()},
                )
                volume.stage()
                devices[synced] = volume.device()
            for cycle in range(run.warmup + run.cycles):
                for workload, (rw, block_size) in WORKLOADS.items():
                    for synced, device in devices.items():
                        rate = fio_mib_per_s(device, rw, block_size)
                        if cycle >= run.warmup:
                            samples[(workload, synced)].append(rate)
    return [
        Comparison(
            f"sync_writes_{workload}",
            "MiB/s",
            samples[(workload, True)],
            "without syncWrites",
            samples[(workload, False)],
        )
        for workload in WORKLOADS
    ]


BENCHMARKS: dict[str, Benchmark] = {"sync_writes": bench_sync_writes}
