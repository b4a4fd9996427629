"""Host tests of the harness parts that need no kernel NBD: fault drawing, data checks,
retry policy, fio result reading (with the real fio) and the validation log."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "harness"))

import common  # noqa: E402
import ha_minio  # noqa: E402
import logs  # noqa: E402
import regression  # noqa: E402
import soak  # noqa: E402


@pytest.mark.parametrize("count", [0, 1, 3, 7])
def test_faults_every_kind_before_repeats_and_only_where_allowed(count: int) -> None:
    faults = regression.draw_faults(random.Random(count), iterations=5, count=count)
    assert len(faults) == count
    kinds = [f.kind for f in faults]
    for kind in regression.ALL_FAULTS:
        assert kinds.count(kind) >= count // len(regression.ALL_FAULTS)
    for fault in faults:
        assert fault.kind in regression.POINTS[fault.point]
        assert 0 <= fault.iteration < 5
    order = [(f.iteration, list(regression.POINTS).index(f.point)) for f in faults]
    assert order == sorted(order)


def test_the_same_seed_draws_the_same_faults() -> None:
    first = regression.draw_faults(random.Random(42), 20, 10)
    again = regression.draw_faults(random.Random(42), 20, 10)
    other = regression.draw_faults(random.Random(43), 20, 10)
    assert first == again
    assert first != other


def write_blocks(path: Path, seed: int, name: str, mib: int) -> None:
    with open(path, "wb") as f:
        for index in range(mib):
            f.write(common.block(seed, name, index))


def test_verify_file_accepts_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "data"
    write_blocks(path, 7, "data", 3)
    common.verify_file(path, 7, "data", 3)


@pytest.mark.parametrize(
    "damage",
    ["flip one byte", "truncated", "other seed"],
)
def test_verify_file_finds_damage(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "data"
    write_blocks(path, 1 if damage == "other seed" else 7, "data", 3)
    if damage == "flip one byte":
        with open(path, "r+b") as f:
            f.seek(common.MiB + 4097)
            byte = f.read(1)
            f.seek(common.MiB + 4097)
            f.write(bytes([byte[0] ^ 0x01]))
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(2 * common.MiB + 10)
    with pytest.raises(common.HarnessFailure, match="MiB"):
        common.verify_file(path, 7, "data", 3)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"


def test_retry_on_aborted_and_unavailable_then_success(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    answers = [grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, None]
    retried: list[str] = []

    def rpc() -> str:
        code = answers.pop(0)
        if code is not None:
            raise FakeRpcError(code)
        return "done"

    assert common.call_with_retry("NodeStage", rpc, 60, retried) == "done"
    assert retried == ["NodeStage: ABORTED", "NodeStage: UNAVAILABLE"]


def test_no_retry_on_other_codes() -> None:
    def rpc() -> None:
        raise FakeRpcError(grpc.StatusCode.INTERNAL)

    with pytest.raises(common.HarnessFailure, match="NodeStage: INTERNAL: fake INTERNAL"):
        common.call_with_retry("NodeStage", rpc, 60)


def test_retry_gives_up_after_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(common.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(common.time, "sleep", lambda s: None)

    def rpc() -> None:
        raise FakeRpcError(grpc.StatusCode.ABORTED)

    with pytest.raises(common.HarnessFailure, match="ABORTED"):
        common.call_with_retry("NodeUnstage", rpc, 35)


needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


@needs_fio
def test_fio_verification_passes_on_intact_data_and_fails_on_a_changed_block(
    tmp_path: Path,
) -> None:
    path = tmp_path / "file"
    job = soak.fio_job("unit", path, "--rw=write", "--bs=64k", "--size=4M", "--direct=0")
    written = soak.run_fio("write", [*job, "--do_verify=0"], 120)
    assert (written.returncode, written.io_errors, written.verify_errors) == (0, 0, 0)
    assert written.written_mib == 4
    intact = soak.run_fio("verify", [*job, "--verify_only"], 120)
    assert (intact.returncode, intact.verify_errors) == (0, 0)
    assert intact.read_mib == 4

    with open(path, "r+b") as f:
        f.seek(3 * 65536 + 1000)  # inside the fourth block's data, after its header
        f.write(b"\xff\x00" * 8)
    damaged = soak.run_fio("verify", [*job, "--verify_only"], 120)
    assert damaged.returncode != 0
    assert damaged.verify_errors == 1
    assert damaged.io_errors == 0


def test_validation_log_collects_verdicts_bench_and_plugin_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "regression.json").write_text(
        json.dumps({"passed": True, "iterations": 3, "seed": 5, "faults": [{}, {}]})
    )
    (harness / "soak.json").write_text(
        json.dumps({"passed": False, "failure": "fio: 1 verification failures", "kills": []})
    )
    (harness / "regression.plugin.log").write_text("\n".join(f"line {i}" for i in range(500)))
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "results": [
                    {
                        "name": "attach",
                        "unit": "ms",
                        "ours": {"p50": 20.0, "p95": 30.0},
                        "baseline": {"name": "nbd-client", "p50": 300.0, "p95": 400.0},
                        "ratio_p50": 0.0667,
                    }
                ]
            }
        )
    )
    monkeypatch.setattr(logs, "HARNESS_DIR", harness)
    monkeypatch.setattr(logs, "BENCH_JSON", bench)
    text = logs.collect()
    assert "PASS  regression" in text and "iterations=3 seed=5 faults=2" in text
    assert "FAIL  soak" in text and "failure: fio: 1 verification failures" in text
    assert "attach" in text and "nbd-client" in text and "0.067" in text
    assert "line 499" in text and "line 99\n" not in text  # only the tail of the log


def test_excluded_pairs_are_never_drawn() -> None:
    excluded = frozenset({regression.SERVER_KILL_UNDER_WRITER})
    for seed in range(50):
        for fault in regression.draw_faults(random.Random(seed), 3, 3, excluded):
            assert (fault.point, fault.kind) not in excluded


def test_a_fault_window_keeps_each_warning_once_with_the_secret_masked(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("2026-12-06T10:00:00Z ERROR before the window\n")
    window = ha_minio.LogWindow(log)
    with open(log, "a") as f:
        for attempt in range(30):
            f.write(f"2026-12-06T10:00:{attempt:02d}Z  WARN retrying PUT, attempt {attempt}\n")
        f.write("2026-12-06T10:01:00Z  INFO flushed 12 entries\n")
        f.write("2026-12-06T10:01:01Z ERROR s3 refused key s3cr3t-value: SlowDown\n")
    problems = ha_minio.distinct_problems(window.lines(), "s3cr3t-value")
    assert problems == [
        "2026-12-06T10:00:00Z  WARN retrying PUT, attempt 0",
        "2026-12-06T10:01:01Z ERROR s3 refused key ***: SlowDown",
    ]


def test_a_log_rotated_in_the_window_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("old line\n" * 100)
    window = ha_minio.LogWindow(log)
    log.write_text("ERROR after the restart\n")
    assert list(window.lines()) == ["ERROR after the restart"]


@pytest.mark.parametrize(
    ("start", "end", "longest", "count"),
    [
        (0.0, 100.0, 9.0, 3),
        (4.0, 5.0, 9.0, 1),
        (11.5, 11.9, 0.0, 0),
        (10.5, 12.5, 1.0, 2),
        (11.2, 12.2, 0.5, 1),
    ],
)
def test_the_longest_pause_is_of_the_writes_overlapping_the_window(
    tmp_path: Path, start: float, end: float, longest: float, count: int
) -> None:
    probe = ha_minio.PauseProbe(tmp_path / "probe")
    probe.writes = [(1.0, 10.0), (10.0, 11.0), (12.0, 12.5)]
    pause, writes = probe.longest_pause(start, end)
    assert (pause, writes) == (pytest.approx(longest), count)


def test_a_write_still_under_way_is_a_pause_until_the_window_ends(tmp_path: Path) -> None:
    probe = ha_minio.PauseProbe(tmp_path / "probe")
    probe.writes = [(1.0, 1.5)]
    probe.in_flight = 2.0
    assert probe.longest_pause(0.0, 40.0) == (pytest.approx(38.0), 2)


def test_the_probe_writes_with_direct_io(tmp_path: Path) -> None:
    probe = ha_minio.PauseProbe(tmp_path / "probe")
    probe.start()
    time.sleep(1.6)
    probe.stopped.set()
    probe.join(10)
    assert probe.error is None
    assert len(probe.writes) >= 2
