"""Draw the benchmark ratios of ``build/bench.json`` as a PNG (``build/bench.png``).

    python -m zerofs_csi.bench_chart [build/bench.json] [build/bench.png]

One horizontal bar per entry: ``ratio_p50`` = ours / baseline on a log scale, drawn from
the line at 1 (parity) to the ratio. For times (ms, s) a bar left of the line means ours
is faster; for throughput (MiB/s) a bar right of it does. Bars are coloured by which
side wins, each labelled with its ratio and the two p50 figures.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INPUT = Path("build/bench.json")
DEFAULT_OUTPUT = Path("build/bench.png")
# Units where a larger figure is better; every other unit is a cost.
HIGHER_IS_BETTER = frozenset({"MiB/s", "MB/s", "IOPS", "ops/s"})
OURS_WIN = "#2e7d32"
OURS_LOSE = "#c62828"


@dataclass(frozen=True)
class Bar:
    name: str
    ratio: float
    unit: str
    ours_p50: float
    baseline_name: str
    baseline_p50: float

    @property
    def ours_better(self) -> bool:
        return self.ratio > 1 if self.unit in HIGHER_IS_BETTER else self.ratio < 1

    @property
    def label(self) -> str:
        return (
            f"{self.ratio:.3g}x  ({self.ours_p50:.4g} vs {self.baseline_p50:.4g} {self.unit}, "
            f"{self.baseline_name})"
        )


def bars_from(results: Sequence[dict[str, object]]) -> list[Bar]:
    """Entries with a usable ratio, in file order; others (no baseline figure) are left
    out of the chart."""
    bars = []
    for entry in results:
        ratio = entry.get("ratio_p50")
        ours = entry.get("ours")
        base = entry.get("baseline")
        if not isinstance(ratio, int | float) or ratio <= 0:
            continue
        if not isinstance(ours, dict) or not isinstance(base, dict):
            continue
        bars.append(
            Bar(
                str(entry["name"]),
                float(ratio),
                str(entry.get("unit", "")),
                float(ours["p50"]),
                str(base.get("name", "baseline")),
                float(base["p50"]),
            )
        )
    return bars


def draw(
    bars: Sequence[Bar], output: Path, title: str = "zerofs-csi: ours / baseline (p50)"
) -> None:
    """Write the chart; raises SystemExit when matplotlib is missing or nothing to draw."""
    if not bars:
        raise SystemExit("no benchmark entry with a ratio to draw")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "drawing the chart needs matplotlib: pip install 'zerofs-csi[bench]'"
        ) from None

    height = 1.0 + 0.45 * len(bars)
    fig, ax = plt.subplots(figsize=(11, height), dpi=110)
    positions = list(range(len(bars)))[::-1]
    ratios = [bar.ratio for bar in bars]
    colours = [OURS_WIN if bar.ours_better else OURS_LOSE for bar in bars]
    # Each bar spans from parity to its ratio, so its length is the size of the difference.
    starts = [min(r, 1.0) for r in ratios]
    widths = [abs(r - 1.0) for r in ratios]
    ax.barh(positions, widths, left=starts, color=colours, height=0.6)
    ax.set_xscale("log")
    low = min(min(ratios) / 2, 0.5)
    high = max(max(ratios) * 40, 4)  # room for the labels right of the bars
    ax.set_xlim(low, high)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(positions, [f"{bar.name} [{bar.unit}]" for bar in bars], fontsize=9)
    for position, bar in zip(positions, bars, strict=True):
        ax.text(max(bar.ratio, 1.0) * 1.08, position, bar.label, va="center", fontsize=8)
    ax.set_xlabel(
        "ratio ours / baseline (log scale; time: left of 1 is faster, MiB/s: right of 1 is faster)"
    )
    ax.set_title(title)
    ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def draw_file(source: Path, output: Path) -> int:
    results = json.loads(source.read_text())["results"]
    bars = bars_from(results)
    draw(bars, output)
    return len(bars)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 2 or any(a.startswith("-") for a in args):
        print("usage: python -m zerofs_csi.bench_chart [BENCH_JSON] [PNG]", file=sys.stderr)
        return 2
    source = Path(args[0]) if args else DEFAULT_INPUT
    output = Path(args[1]) if len(args) > 1 else DEFAULT_OUTPUT
    count = draw_file(source, output)
    print(f"wrote {output} ({count} ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
