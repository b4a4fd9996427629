"""A CI-sized chaos run (``make chaos`` runs long ones): one round of each fault under a
writer (4 MiB writes, an fsync every 16 MiB, ext4): a server stall that outlasts the
plugin's hung-server window, a server kill, a plugin kill, and both killed together. The
writer never sees an error, every fsync'd MiB reads back after each round and after a
restage, and the kernel logs no I/O error, journal abort, read-only remount or
suspicious reply.

Set HARNESS_SEED to replay a failed run (its seed is printed first and in the failure).

python3 tests/vm/runner.py --timeout 1200 -- .venv/bin/pytest -m privileged -x -q -s \
    tests/privileged/test_harness_chaos.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "harness"))

import chaos  # noqa: E402

pytestmark = pytest.mark.privileged

HUNG_AFTER_S = 15.0
# The long stall is drawn between HUNG_AFTER_S + 5 s and this, the stuck unmount's from 5 s:
# long enough to cross the window, short enough for CI (make chaos draws up to 120 s).
MAX_STALL_S = 24.0


def test_one_round_of_each_fault_under_a_writer(tmp_path: Path) -> None:
    seed = int(os.environ["HARNESS_SEED"]) if os.environ.get("HARNESS_SEED") else None
    results = chaos.run(
        len(chaos.KINDS),
        seed=seed,
        max_stall=MAX_STALL_S,
        hung_after=HUNG_AFTER_S,
        workdir=tmp_path / "run",
        results_name="ci-chaos",
    )
    assert results["passed"], f"seed {results['seed']}: {results['failure']}"
    rounds = results["rounds"]
    assert isinstance(rounds, list)
    assert {r["kind"] for r in rounds} == set(chaos.KINDS)
    # The stall outlasted the hung-server window: the server was replaced while stopped.
    stall = next(r for r in rounds if r["kind"] == chaos.STALL)
    assert stall["seconds"] > HUNG_AFTER_S and "replaced by" in stall["detail"], stall
    assert results["durable_mib"] > 0
