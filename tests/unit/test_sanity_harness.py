"""The csi-sanity harness's verdict on a Ginkgo JUnit report (tools/harness/sanity.py):
what passes, and each way a run must fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "harness"))

import sanity  # noqa: E402

PASSED = (
    '<testcase name="[It] Node Service NodeGetInfo should return appropriate values" '
    'status="passed"/>'
)
NOT_CLAIMED = (
    '<testcase name="[It] GetSnapshot [Controller Server] should return an error" '
    'status="skipped"><skipped message="skipped - GetSnapshot not supported"/></testcase>'
)
PENDING = (
    '<testcase name="[It] Controller Service [Controller Server] ListVolumes pagination" '
    'status="pending"><skipped message="pending"/></testcase>'
)
EXPANSION_AFTER_PUBLISH = (
    '<testcase name="[It] Node Service NodeExpandVolume should work if node-expand is called '
    'after node-publish" status="skipped"><skipped message="skipped"/></testcase>'
)
FAILED = (
    '<testcase name="[It] Node Service NodeExpandVolume should fail when volume is not found" '
    'status="failed"><failure message="unexpected error: must be positive&#10;Expected" '
    'type="failed">[FAILED]</failure></testcase>'
)
OTHER_DESELECTED = (
    '<testcase name="[It] Node Service NodeStageVolume should fail when no volume id is '
    'provided" status="skipped"><skipped message="skipped"/></testcase>'
)
NO_LIMIT = (
    '<testcase name="[It] Controller Service [Controller Server] ControllerPublishVolume should '
    'fail when publishing more volumes than the node max attach limit" status="skipped">'
    '<skipped message="skipped - No MaxVolumesPerNode"/></testcase>'
)
LEFT_TO_THE_CONTROLLER_RUN = (
    '<testcase name="[It] Controller Service [Controller Server] CreateVolume should create '
    'volume from an existing source snapshot" status="skipped"><skipped message="skipped"/>'
    "</testcase>"
)
SETUP = '<testcase name="[SynchronizedBeforeSuite]" status="passed"/>'


def report(tmp_path: Path, *cases: str) -> sanity.Totals:
    path = tmp_path / "report.xml"
    path.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="CSI Driver Test Suite">'
        + "".join(cases)
        + "</testsuite></testsuites>"
    )
    return sanity.read_junit(path)


def test_a_full_run_leaving_only_the_snapshot_specs_to_the_controller_run_passes(
    tmp_path: Path,
) -> None:
    totals = report(tmp_path, SETUP, PASSED, NOT_CLAIMED, PENDING, LEFT_TO_THE_CONTROLLER_RUN)
    assert totals.line() == (
        "1 passed, 0 failed, 1 skipped by csi-sanity (capabilities not claimed); "
        "1 not selected, 1 pending"
    )
    assert totals.skipped == {
        "GetSnapshot [Controller Server] should return an error": "GetSnapshot not supported"
    }
    assert sanity.problems(totals, "all") == []


@pytest.mark.parametrize(
    ("case", "run", "problem"),
    [
        (FAILED, "controller", "FAILED: Node Service NodeExpandVolume should fail when volume "
         "is not found: unexpected error: must be positive"),
        (OTHER_DESELECTED, "all", "NOT SELECTED: Node Service NodeStageVolume"),
        (EXPANSION_AFTER_PUBLISH, "all", "NOT SELECTED: Node Service NodeExpandVolume"),
        (NO_LIMIT, "controller", "SKIPPED (No MaxVolumesPerNode)"),
    ],
)  # fmt: skip
def test_what_fails_a_run(tmp_path: Path, case: str, run: str, problem: str) -> None:
    found = sanity.problems(report(tmp_path, PASSED, case), run)
    assert len(found) == 1 and found[0].startswith(problem), found


def test_a_run_where_nothing_passed_fails(tmp_path: Path) -> None:
    assert sanity.problems(report(tmp_path, NOT_CLAIMED), "controller") == ["no spec passed"]
