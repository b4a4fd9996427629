"""Attach cost as devices accumulate, and start-up reconciliation of orphaned devices.

- ``attach_with_N_attached`` (N = 1, 16, 64): attach with N devices already connected,
  ours against ``nbd-client``; ``attach_64_vs_1_attached``: ours with 64 against ours with
  1, which must stay near 1 (the attach path looks at one device, not all of them).
- ``reconcile_32_orphans``: the node plugin's recovery (``zerofs_csi.recovery``) finding
  and detaching 32 devices of ours whose volumes are not staged, against exec'ing
  ``nbd-client -d`` for each of 32 devices, as the Go driver's start-up cleanup does.

Same nbdkit memory server for every device, same VM, contenders interleaved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from zerofs_csi.bench.devices import EXPORT, nbd_client_attach, nbdkit_memory
from zerofs_csi.bench.measure import Benchmark, Comparison, Timer
from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.node.recovery import Recovery
from zerofs_csi.node.stage_record import RecordStore, StageRecord, backend_id_for
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.servers.local import ProcessBackend

ATTACHED_COUNTS = (1, 16, 64)
ORPHANS = 32


def nbd_client_detach(device: str) -> None:
    subprocess.run(
        ["nbd-client", "-d", device],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def settle_udev() -> None:
    """Wait for udev to finish the events of the devices just attached, so that neither
    contender is measured against a backlog of probes left by the set-up."""
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "--timeout=120"], check=False)


def bench_attach_scaling(cycles: int, warmup: int, server_threads: int) -> list[Comparison]:
    attacher = nbd.NbdAttacher()
    netlink = _nbd.NbdNetlink()
    timer = Timer()
    fillers: list[tuple[int, str]] = []
    ours: dict[int, list[float]] = {}
    client: dict[int, list[float]] = {}
    prefix = f"bench-scale-{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory() as tmp, nbdkit_memory(tmp, server_threads) as sock:
            for count in ATTACHED_COUNTS:
                while len(fillers) < count:
                    backend = f"{prefix}-fill-{len(fillers)}"
                    device = attacher.attach(sock, EXPORT, backend, connections=1)
                    fillers.append((device.index, backend))
                settle_udev()
                ours[count], client[count] = [], []
                for i in range(warmup + cycles):
                    record = i >= warmup
                    backend = f"{prefix}-{count}-{i}"
                    with timer.measure():
                        device = attacher.attach(sock, EXPORT, backend, connections=1)
                    if record:
                        ours[count].append(timer.ms)
                    attacher.detach(device.index, backend)
                    path, ms = nbd_client_attach(netlink, sock)
                    if record:
                        client[count].append(ms)
                    nbd_client_detach(path)
            for index, backend in fillers:
                attacher.detach(index, backend)
            fillers.clear()
    finally:
        for index, backend in fillers:
            attacher.detach(index, backend)
        attacher.close()
        netlink.close()
    low, high = ATTACHED_COUNTS[0], ATTACHED_COUNTS[-1]
    comparisons = [
        Comparison(f"attach_with_{n}_attached", "ms", ours[n], "nbd-client", client[n])
        for n in ATTACHED_COUNTS
    ]
    comparisons.append(
        Comparison(
            f"attach_{high}_vs_{low}_attached", "ms", ours[high], f"ours, {low} attached", ours[low]
        )
    )
    return comparisons


def bench_reconcile(cycles: int, warmup: int, server_threads: int) -> list[Comparison]:
    """Each round attaches ``ORPHANS`` devices for each contender, then times the whole
    clean-up: one recovery pass for ours, the ``nbd-client -d`` loop for the baseline."""
    attacher = nbd.NbdAttacher()
    node_attacher = NodeAttacher(attacher)
    netlink = _nbd.NbdNetlink()
    timer = Timer()
    ours: list[float] = []
    baseline: list[float] = []
    rounds = max(1, cycles)
    with tempfile.TemporaryDirectory() as tmp, nbdkit_memory(tmp, server_threads) as sock:
        state = Path(tmp) / "state"
        backend = ProcessBackend(state, command="zerofs")

        def no_record_to_tear_down(record: StageRecord) -> None:
            raise AssertionError(f"nothing is staged, yet recovery tore down {record}")

        try:
            for i in range(warmup + rounds):
                record = i >= warmup
                orphans = {
                    attacher.attach(
                        sock, EXPORT, backend_id_for(f"orphan-{i}-{n}"), connections=1
                    ).index
                    for n in range(ORPHANS)
                }
                recovery = Recovery(
                    RecordStore(state),
                    node_attacher,
                    backend,
                    VolumeLocks(),
                    Metrics("bench", CollectorRegistry()),
                    no_record_to_tear_down,
                )
                with timer.measure():
                    report = recovery.run()
                if sorted(report.orphans_detached) != sorted(orphans):
                    raise SystemExit(
                        f"recovery detached {sorted(report.orphans_detached)}, "
                        f"orphans were {sorted(orphans)}"
                    )
                if record:
                    ours.append(timer.ms)

                devices = [nbd_client_attach(netlink, sock)[0] for _ in range(ORPHANS)]
                with timer.measure():
                    for device in devices:
                        nbd_client_detach(device)
                if record:
                    baseline.append(timer.ms)
        finally:
            backend.close()
            attacher.close()
            netlink.close()
    return [
        Comparison(
            f"reconcile_{ORPHANS}_orphans", "ms", ours, f"{ORPHANS}x nbd-client -d", baseline
        )
    ]


BENCHMARKS: dict[str, Benchmark] = {
    "attach_scaling": lambda run: bench_attach_scaling(run.cycles, run.warmup, run.server_threads),
    "reconcile": lambda run: bench_reconcile(run.cycles, run.warmup, run.server_threads),
}
