"""Benchmarks of the node's hot paths against the tools the Go driver execs.

    python -m zerofs_csi.bench [--cycles N] [--output build/bench.json] [--only NAME ...]

Runs as root where the kernel has NBD (the microVM: ``make bench``). Every comparison
runs its contenders interleaved, cycle by cycle, in the same process against the same
server, because only ratios taken in one run mean anything under TCG. Results are
written as ``{"results": [{"name", "unit", "ours": {"p50", "p95"}, "baseline": {"name",
"p50", "p95"}, "ratio_p50"}, ...]}``; an existing file's entries of other names are
kept, so benchmarks added by other modules can write to the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from zerofs_csi import _nbd, nbd

DEFAULT_OUTPUT = Path("build/bench.json")
EXPORT = "bench"
EXPORT_SIZE = "1G"
SERVER_THREADS = 1


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Comparison:
    name: str
    unit: str
    ours: list[float]
    baseline_name: str
    baseline: list[float]

    def result(self) -> dict[str, object]:
        ours_p50 = percentile(self.ours, 50)
        base_p50 = percentile(self.baseline, 50)
        return {
            "name": self.name,
            "unit": self.unit,
            "ours": {"p50": round(ours_p50, 3), "p95": round(percentile(self.ours, 95), 3)},
            "baseline": {
                "name": self.baseline_name,
                "p50": round(base_p50, 3),
                "p95": round(percentile(self.baseline, 95), 3),
            },
            "ratio_p50": round(ours_p50 / base_p50, 4) if base_p50 else None,
        }


class Timer:
    def __init__(self) -> None:
        self.ms = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms = (time.perf_counter() - started) * 1000


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
            for _attempt in range(5):
                # A device udev opened after the scan makes nbd-client fail (EBUSY):
                # such attempts are retried and not counted.
                device = free_device(netlink)
                with timer.measure():
                    done = subprocess.run(
                        ["nbd-client", "-unix", sock, "-N", EXPORT, device],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                if done.returncode == 0:
                    break
            else:
                raise SystemExit("nbd-client failed five times in a row")
            if record:
                client_attach.append(timer.ms)
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


BENCHMARKS: dict[str, Callable[[int, int, int], list[Comparison]]] = {"attach": bench_attach}


def print_table(comparisons: Sequence[Comparison], out: TextIO = sys.stdout) -> None:
    header = f"{'name':<26}{'ours p50':>10}{'ours p95':>10}  {'baseline':<16}{'p50':>9}{'p95':>9}"
    lines = [header + f"{'ratio p50':>11}", "-" * (len(header) + 11)]
    for comparison in comparisons:
        r = comparison.result()
        ours = r["ours"]
        base = r["baseline"]
        assert isinstance(ours, dict) and isinstance(base, dict)
        lines.append(
            f"{comparison.name:<26}{ours['p50']:>10.2f}{ours['p95']:>10.2f}  "
            f"{base['name']:<16}{base['p50']:>9.2f}{base['p95']:>9.2f}{r['ratio_p50']:>11.3f}"
        )
    print("\n".join(lines), file=out)


def write_results(path: Path, comparisons: Sequence[Comparison]) -> None:
    fresh = [c.result() for c in comparisons]
    names = {r["name"] for r in fresh}
    kept: list[dict[str, object]] = []
    if path.exists():
        try:
            kept = [r for r in json.loads(path.read_text())["results"] if r["name"] not in names]
        except (ValueError, KeyError, TypeError):
            kept = []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": kept + fresh}, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerofs_csi.bench", description=__doc__)
    parser.add_argument("--cycles", type=int, default=30, help="measured cycles per contender")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured cycles first")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=SERVER_THREADS,
        help="nbdkit worker threads per connection",
    )
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=[])
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.warmup < 0 or args.server_threads < 1:
        parser.error("--cycles and --server-threads must be at least 1, --warmup not negative")
    comparisons: list[Comparison] = []
    for name in args.only or sorted(BENCHMARKS):
        comparisons.extend(BENCHMARKS[name](args.cycles, args.warmup, args.server_threads))
    print_table(comparisons)
    write_results(args.output, comparisons)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    # ``python -m zerofs_csi.bench`` runs the whole suite: these benchmarks, the node,
    # scaling and throughput ones (modules that import this one), the JSON and the chart.
    from zerofs_csi.bench_suite import main as run_suite

    raise SystemExit(run_suite())
