"""A CI-sized pass of the NBD regression harness with chaos (``make nbd-regression`` runs
the full one): three stage/publish/write/unstage cycles through the CSI API, one fault of
each kind (plugin kill -9, server kill -9, socket deletion) at seeded random points.

Set HARNESS_SEED to replay the faults of a failed run (its seed is in the failure).

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_harness_regression.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "harness"))

import regression  # noqa: E402

pytestmark = pytest.mark.privileged

ITERATIONS = 3


def test_regression_cycles_with_one_fault_of_each_kind(tmp_path: Path) -> None:
    seed = int(os.environ["HARNESS_SEED"]) if os.environ.get("HARNESS_SEED") else None
    results = regression.run(
        ITERATIONS,
        chaos=True,
        seed=seed,
        events=len(regression.ALL_FAULTS),
        workdir=tmp_path / "run",
        results_name="ci-regression-chaos",
        # The reconnect and chaos tests cover a server killed under the writer, so CI
        # spends this test's VM time on the other faults.
        excluded=frozenset({regression.SERVER_KILL_UNDER_WRITER}),
    )
    assert results["passed"], f"seed {results['seed']}: {results['failure']}"
    assert results["completed_iterations"] == ITERATIONS
    faults = results["faults"]
    assert isinstance(faults, list)
    assert {f["kind"] for f in faults} == set(regression.ALL_FAULTS)
    assert all(f["recovered_in_s"] is not None for f in faults), faults
    cycles = results["cycles"]
    assert isinstance(cycles, list)
    # The last restage read back every MiB written in the iterations.
    assert cycles[-1]["verified_mib"] == sum(c["written_mib"] for c in cycles[:-1]) > 0
