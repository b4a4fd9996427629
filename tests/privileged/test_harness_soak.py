"""A CI-sized soak (``make soak`` runs the long one): fio with crc32c verification on a
staged volume while its server is killed with SIGKILL; zero I/O errors, zero verification
failures, and the sequential file read back intact through a fresh attach.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -m privileged -x -q \
    tests/privileged/test_harness_soak.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "harness"))

import soak  # noqa: E402

pytestmark = pytest.mark.privileged


def test_short_soak_with_server_kills(tmp_path: Path) -> None:
    results = soak.run(duration=15, kill_every=6, workdir=tmp_path / "run", results_name="ci-soak")
    assert results["passed"], results["failure"]
    kills = results["kills"]
    assert isinstance(kills, list) and len(kills) >= 2  # one in each phase at least
    fio = {run["phase"]: run for run in results["fio"]}  # type: ignore[attr-defined]
    assert fio["verify after restage"]["read_mib"] >= soak.SEQUENTIAL_FILE_MIB
    assert fio["random writes, verified while running"]["written_mib"] > 0
