"""Samples and their comparison, the table and the results file of every benchmark.

Results are written as ``{"results": [{"name", "unit", "ours": {"p50", "p95"},
"baseline": {"name", "p50", "p95"}, "ratio_p50", "server": {"command", "real",
"version"}}, ...]}``, ``server`` being the per-volume server of the run that measured the
entry; an existing file's entries of other names are kept, so benchmarks run apart can
write to the same file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from zerofs_csi.bench.plugin import S3Storage
from zerofs_csi.bench.zerofs_server import ZeroFSServer

DEFAULT_OUTPUT = Path("build/bench.json")


@dataclass(frozen=True)
class RunOptions:
    """What one benchmark run is asked for."""

    cycles: int  # measured cycles per contender
    warmup: int  # unmeasured cycles first
    server_threads: int  # nbdkit worker threads per connection (attach-path benchmarks)
    zerofs_command: str  # the per-volume server the node benchmarks start
    s3: S3Storage | None = None  # where the node benchmarks' volumes live; None: file://


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


Benchmark = Callable[[RunOptions], list[Comparison]]


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


def print_table(
    comparisons: Sequence[Comparison], server: ZeroFSServer, out: TextIO = sys.stdout
) -> None:
    header = f"{'name':<26}{'ours p50':>10}{'ours p95':>10}  {'baseline':<16}{'p50':>9}{'p95':>9}"
    lines = [
        f"server: {server.describe()}",
        header + f"{'ratio p50':>11}",
        "-" * (len(header) + 11),
    ]
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


def write_results(path: Path, comparisons: Sequence[Comparison], server: ZeroFSServer) -> None:
    fresh = [{**c.result(), "server": asdict(server)} for c in comparisons]
    names = {r["name"] for r in fresh}
    kept: list[dict[str, object]] = []
    if path.exists():
        try:
            kept = [r for r in json.loads(path.read_text())["results"] if r["name"] not in names]
        except (ValueError, KeyError, TypeError):
            kept = []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": kept + fresh}, indent=2) + "\n")
