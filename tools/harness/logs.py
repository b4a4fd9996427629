"""Collect the validation evidence into one file: ``make logs``.

    python tools/harness/logs.py [--output validation-logs.txt]

Gathers, from ``build/``: the harness results (``build/harness/*.json``: regression,
chaos, soak) with a one-line verdict each, the benchmark results (``build/bench.json``)
as a table, and the plugin log of every harness run (``build/harness/*.plugin.log``),
plus the host and kernel facts needed to read them. Reads files only; runs nothing that
needs the VM, so it also works after a failed run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS_DIR = REPO / "build" / "harness"
BENCH_JSON = REPO / "build" / "bench.json"
DEFAULT_OUTPUT = REPO / "validation-logs.txt"
# Plugin logs are long; the end holds the failure when there is one.
LOG_TAIL_LINES = 400


def section(title: str, body: str) -> str:
    return f"\n{'=' * 78}\n{title}\n{'=' * 78}\n{body.rstrip()}\n"


def verdict(name: str, results: dict[str, object]) -> str:
    state = "PASS" if results.get("passed") else "FAIL"
    facts = []
    for key in ("iterations", "seed", "duration_s", "kill_every_s"):
        if key in results:
            facts.append(f"{key}={results[key]}")
    for key in ("faults", "kills"):
        value = results.get(key)
        if isinstance(value, list):
            facts.append(f"{key}={len(value)}")
    line = f"{state}  {name:<28} {' '.join(facts)}"
    if results.get("failure"):
        line += f"\n      failure: {results['failure']}"
    return line


def bench_table(results: list[dict[str, object]]) -> str:
    lines = [
        f"{'name':<34}{'unit':>6}{'ours p50':>11}{'ours p95':>11}  {'baseline':<28}"
        f"{'p50':>10}{'p95':>10}{'ratio':>9}"
    ]
    for r in results:
        ours = r.get("ours") or {}
        base = r.get("baseline") or {}
        assert isinstance(ours, dict) and isinstance(base, dict)
        ratio = r.get("ratio_p50")
        lines.append(
            f"{r.get('name', '?')!s:<34}{r.get('unit', '')!s:>6}{ours.get('p50', 0):>11.2f}"
            f"{ours.get('p95', 0):>11.2f}  {str(base.get('name', ''))[:27]:<28}"
            f"{base.get('p50', 0):>10.2f}{base.get('p95', 0):>10.2f}"
            + (f"{ratio:>9.3f}" if isinstance(ratio, int | float) else f"{'-':>9}")
        )
    return "\n".join(lines)


def tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    cut = len(text) - lines
    head = f"(first {cut} lines left out)\n" if cut > 0 else ""
    return head + "\n".join(text[-lines:])


def collect() -> str:
    parts = [
        "zerofs-csi validation logs",
        f"collected {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"host {platform.node()} {platform.platform()}",
    ]
    revision = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    if revision:
        parts.append(f"revision {revision}")
    out = "\n".join(parts) + "\n"

    verdicts = []
    details = []
    for path in sorted(HARNESS_DIR.glob("*.json")):
        try:
            results = json.loads(path.read_text())
        except ValueError as exc:
            verdicts.append(f"FAIL  {path.stem:<28} unreadable results: {exc}")
            continue
        verdicts.append(verdict(path.stem, results))
        details.append(section(f"harness results: {path.name}", json.dumps(results, indent=2)))
    out += section(
        "harness verdicts", "\n".join(verdicts) or "(no harness results in build/harness)"
    )

    if BENCH_JSON.exists():
        try:
            bench = json.loads(BENCH_JSON.read_text())["results"]
            out += section("benchmarks (build/bench.json)", bench_table(bench))
        except (ValueError, KeyError, TypeError) as exc:
            out += section("benchmarks (build/bench.json)", f"unreadable: {exc}")
    else:
        out += section("benchmarks", "(no build/bench.json: run make bench)")

    out += "".join(details)
    for path in sorted(HARNESS_DIR.glob("*.plugin.log")):
        out += section(
            f"plugin log: {path.name} (last {LOG_TAIL_LINES} lines)", tail(path, LOG_TAIL_LINES)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    text = collect()
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
