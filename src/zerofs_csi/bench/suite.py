"""Every benchmark in one run: the attach path's and the node, scaling, throughput and
recovery ones, then the table, ``build/bench.json`` and the ratio chart.

    python -m zerofs_csi.bench [--cycles N] [--heavy-cycles N] [--only NAME ...]

Runs as root where the kernel has NBD (the microVM). ``--heavy-cycles`` is for the
benchmarks whose every cycle starts servers, makes filesystems, runs fio or attaches 32
devices (a few cycles already take minutes under TCG), and ``--chart`` for the PNG. The
per-volume server is ZeroFS (``ZEROFS_BIN``, else ``zerofs`` on PATH), else a checkout's
stand-in; the table and every result say which ran. ZeroFS refuses ``file://`` storage,
so with ZeroFS the stage benchmark puts both sides' volumes in the bucket of
``--s3-endpoint`` and ``--s3-bucket`` (credentials from ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from zerofs_csi.bench import (
    attach,
    chart,
    node,
    recovery,
    scale,
    snapshots,
    sync_writes,
    throughput,
)
from zerofs_csi.bench.devices import SERVER_THREADS
from zerofs_csi.bench.measure import (
    DEFAULT_OUTPUT,
    Benchmark,
    Comparison,
    RunOptions,
    print_table,
    write_results,
)
from zerofs_csi.bench.plugin import S3Storage
from zerofs_csi.bench.zerofs_server import ServerNotFound, zerofs_server

DEFAULT_CHART = Path("build/bench.png")
DEFAULT_HEAVY_CYCLES = 5
HEAVY = frozenset(
    {
        "stage",
        "concurrent_stage",
        "reconcile",
        "throughput",
        "server_kill",
        "sync_writes",
        "snapshot",
    }
)


def all_benchmarks() -> dict[str, Benchmark]:
    return {
        **attach.BENCHMARKS,
        **scale.BENCHMARKS,
        **throughput.BENCHMARKS,
        **node.BENCHMARKS,
        **recovery.BENCHMARKS,
        **snapshots.BENCHMARKS,
        **sync_writes.BENCHMARKS,
    }


def cycles_for(name: str, cycles: int, heavy_cycles: int, warmup: int) -> tuple[int, int]:
    """(cycles, warm-up cycles) for one benchmark."""
    if name in HEAVY:
        return heavy_cycles, min(warmup, 1)
    return cycles, warmup


def main(argv: Sequence[str] | None = None) -> int:
    benchmarks = all_benchmarks()
    parser = argparse.ArgumentParser(prog="python -m zerofs_csi.bench", description=__doc__)
    parser.add_argument("--cycles", type=int, default=30, help="measured cycles per contender")
    parser.add_argument(
        "--heavy-cycles",
        type=int,
        default=DEFAULT_HEAVY_CYCLES,
        help=f"measured cycles of {', '.join(sorted(HEAVY))}",
    )
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured cycles first")
    parser.add_argument("--output", "--json", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="PNG of the ratios")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=SERVER_THREADS,
        help="nbdkit worker threads per connection",
    )
    parser.add_argument("--only", action="append", choices=sorted(benchmarks), default=[])
    parser.add_argument("--s3-endpoint", help="S3 endpoint of the node benchmarks' volumes")
    parser.add_argument("--s3-bucket", help="their bucket (with --s3-endpoint)")
    parser.add_argument("--s3-region", default="us-east-1")
    args = parser.parse_args(argv)
    if min(args.cycles, args.heavy_cycles, args.server_threads) < 1 or args.warmup < 0:
        parser.error(
            "--cycles, --heavy-cycles and --server-threads must be at least 1, "
            "--warmup not negative"
        )
    try:
        server = zerofs_server()
    except ServerNotFound as exc:
        parser.error(str(exc))
    s3 = None
    if args.s3_endpoint or args.s3_bucket:
        if not (args.s3_endpoint and args.s3_bucket):
            parser.error("--s3-endpoint and --s3-bucket go together")
        s3 = S3Storage(
            args.s3_endpoint,
            args.s3_bucket,
            os.environ.get("AWS_ACCESS_KEY_ID", ""),
            os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            args.s3_region,
        )
    print(f"bench: server: {server.describe()}", flush=True)
    comparisons: list[Comparison] = []
    for name in args.only or list(benchmarks):
        cycles, warmup = cycles_for(name, args.cycles, args.heavy_cycles, args.warmup)
        print(f"bench: {name}", flush=True)
        run = RunOptions(cycles, warmup, args.server_threads, server.command, s3)
        comparisons.extend(benchmarks[name](run))
    print_table(comparisons, server)
    write_results(args.output, comparisons, server)
    print(f"wrote {args.output}")
    drawn = chart.draw_file(args.output, args.chart)
    print(f"wrote {args.chart} ({drawn} ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
