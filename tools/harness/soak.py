"""Soak: fio with verification on a staged volume while its server is killed again and again.

    python tools/harness/soak.py [--duration S] [--kill-every S]
    python tools/harness/soak.py --minio-set [--fault-hold S] [--fault-gap S] [--kill-every S]

Needs the kernel's NBD driver and root: ``make soak`` runs it in the microVM. One plugin
(local backend, ZeroFS stand-in), one ext4 volume staged and published. Two phases:

1. For ``--duration`` seconds fio writes 4 KiB blocks at random offsets of a file in the
   volume (direct I/O, fsync every 32 writes) and re-reads every block it wrote with its
   crc32c header (``--verify_backlog``, ``--verify_fatal``), while the volume server is
   killed with SIGKILL every ``--kill-every`` seconds (counted from its last restart);
   its supervisor restarts it and the plugin reconnects the device (LINK_DEAD,
   RECONFIGURE). fio may run past ``--duration`` while its last I/O waits.
2. fio writes a second file sequentially (crc32c headers, fsync at the end) with one more
   server kill on the way; the volume is then unpublished, unstaged and staged again, and
   fio's ``--verify_only`` pass reads every block back through the fresh device.

Passes with zero I/O errors and zero verification failures in both phases. Results go to
``build/harness/soak.json``.

``--minio-set`` puts the volume on a distributed MinIO set (``MINIO_BIN``) and, in
phase 1, kills and cuts off its servers instead of the volume server (unless
``--kill-every`` asks for both): ``ha_minio`` has the schedule and what is recorded of
each fault; the results go to ``build/harness/soak-minio.json``. With ``ZEROFS_BIN``
this is ZeroFS itself on HA MinIO (``docs/ha-minio.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    SYNC_WRITES,
    HarnessFailure,
    MiB,
    call_with_retry,
    check,
    kill_server,
    plugin_process,
    write_results,
)
from ha_minio import SERVERS, FaultRecord, PauseProbe, StorageFaults, minio_storage  # noqa: E402
from minio import MinioSet  # noqa: E402
from minio_server import free_port  # noqa: E402

from zerofs_csi.bench.plugin import (  # noqa: E402
    clean_up_volumes,
    connected_nbd_devices,
    create_volume,
    stop_plugin,
)

RANDOM_FILE_MIB = 64
SEQUENTIAL_FILE_MIB = 32
# fio blocks on a dead link until the device is reconnected; requests that were in flight
# are resent at the kernel's next look after it (zerofs_csi.nbd.REQUEUE_TICK_MS).
FIO_SLACK_S = 600.0
# The MinIO set's drives (--minio-set) without --drives-disk: MinIO opens them with
# O_DIRECT, which the microVM's tmpfs (/tmp) refuses; the work tree takes it (a 9p share
# there, slow: a soak writes little).
MINIO_DIR = REPO / ".cache" / "soak-minio"


@dataclass
class Kill:
    at_s: float
    pid: int | None
    restarted_in_s: float | None = None


@dataclass
class FioRun:
    phase: str
    returncode: int
    seconds: float
    io_errors: int
    verify_errors: int
    written_mib: float
    read_mib: float
    error_text: str = ""


@dataclass
class SoakResults:
    duration_s: float
    kill_every_s: float
    kills: list[Kill] = field(default_factory=list)
    fio: list[FioRun] = field(default_factory=list)
    minio: str = ""  # the MinIO set's shape and version, with --minio-set
    storage_faults: list[FaultRecord] = field(default_factory=list)
    probe_error: str = ""


@dataclass(frozen=True)
class StorageFaultPlan:
    hold_s: float
    gap_s: float
    drives: Path = MINIO_DIR


@contextlib.contextmanager
def ext4_on(device: Path) -> Iterator[Path]:
    """A new ext4 filesystem on `device`, mounted for the block: a disk that takes the
    O_DIRECT writes MinIO makes."""
    if not device.exists():
        # The microVM loads virtio_blk only when asked (make soak-minio gives it a disk),
        # with the modprobe the kernel itself calls, which knows where its modules are.
        modprobe = Path("/proc/sys/kernel/modprobe").read_text().strip()
        subprocess.run([modprobe, "virtio_blk"], check=True)
        deadline = time.monotonic() + 30
        while not device.exists():
            if time.monotonic() > deadline:
                raise HarnessFailure(f"{device} did not appear after loading virtio_blk")
            time.sleep(0.2)
    mountpoint = Path(tempfile.mkdtemp(prefix="zerofs-soak-drives-"))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(device)], check=True)
    subprocess.run(["mount", str(device), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        mountpoint.rmdir()


def fio_job(name: str, path: Path, *options: str) -> list[str]:
    return [
        "fio",
        f"--name={name}",
        f"--filename={path}",
        "--ioengine=psync",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
        *options,
    ]


def run_fio(phase: str, argv: list[str], timeout: float) -> FioRun:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    io_errors = verify_errors = 0
    written = read = 0.0
    text = done.stdout
    try:
        report = json.loads(text[text.index("{") :])
    except ValueError:
        report = {"jobs": []}
    for job in report.get("jobs", []):
        # fio ends a job with EILSEQ when a block fails its check, with the errno of
        # the failed call otherwise.
        error = job.get("error", 0)
        if error == errno.EILSEQ:
            verify_errors += 1
        elif error:
            io_errors += 1
        written += job.get("write", {}).get("io_kbytes", 0) / 1024
        read += job.get("read", {}).get("io_kbytes", 0) / 1024
    if done.returncode != 0 and not (io_errors or verify_errors):
        io_errors = 1
    return FioRun(
        phase,
        done.returncode,
        round(seconds, 2),
        io_errors,
        verify_errors,
        round(written, 1),
        round(read, 1),
        done.stderr.strip()[-2000:],
    )


class ServerKiller(threading.Thread):
    """kill -9 of the volume server every ``interval`` seconds for ``window`` seconds
    (counted from ``t0``); records how long the supervisor took to bring a new one up.
    The interval runs from the restart, so kills never pile up on a server that is not
    back yet."""

    def __init__(
        self, volume: Any, interval: float, window: float, results: SoakResults, t0: float
    ) -> None:
        super().__init__(name="server-killer", daemon=True)
        self.volume, self.interval, self.window = volume, interval, window
        self.results, self.t0 = results, t0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            if time.monotonic() - self.t0 > self.window:
                return
            self.kill_once()

    def kill_once(self) -> None:
        killed_at = time.monotonic()
        pid = kill_server(self.volume)
        kill = Kill(round(killed_at - self.t0, 2), pid)
        self.results.kills.append(kill)
        while time.monotonic() - killed_at < 120:
            current = self.volume.server_pid()
            if current is not None and current != pid:
                kill.restarted_in_s = round(time.monotonic() - killed_at, 2)
                break
            time.sleep(0.05)


def soak(
    workdir: Path,
    duration: float,
    kill_every: float,
    log: Callable[[str], None],
    storage_faults: StorageFaultPlan | None = None,
) -> SoakResults:
    results = SoakResults(duration, kill_every)
    minio: MinioSet | None = None
    options: dict[str, Any] = {}
    if storage_faults is not None:
        minio = MinioSet(
            storage_faults.drives / workdir.name,
            Path(os.environ.get("MINIO_BIN", "")),
            servers=SERVERS,
            drives_per_server=1,
        )
        minio.start()
        results.minio = f"MinIO {minio.version}: {len(SERVERS)} servers of 1 drive"
        options = {"s3": minio_storage(minio), "metrics_address": f"127.0.0.1:{free_port()}"}
    plugin = plugin_process(workdir, **options)
    faults: StorageFaults | None = None
    probe: PauseProbe | None = None
    try:
        plugin.start()
        baseline = connected_nbd_devices()
        volume = create_volume(
            plugin, workdir, fs_type="ext4", size=512 * MiB, parameters=SYNC_WRITES
        )
        target = workdir / "pods" / "soak" / "volume"
        call_with_retry("NodeStage", volume.stage)
        call_with_retry("NodePublish", lambda: volume.publish(str(target)))
        t0 = time.monotonic()

        killer = ServerKiller(volume, kill_every, duration, results, t0)
        if kill_every > 0:
            killer.start()
        if minio is not None and storage_faults is not None:
            probe = PauseProbe(target / "probe.dat")
            probe.start()
            faults = StorageFaults(
                minio, plugin, volume, probe,
                hold_s=storage_faults.hold_s, gap_s=storage_faults.gap_s,
                window=duration, t0=t0, log=log,
            )  # fmt: skip
            faults.start()
        log(
            f"soak: phase 1, {duration:.0f} s of verified random writes, "
            + (f"kill -9 every {kill_every:.0f} s" if kill_every > 0 else "no server kills")
            + (f"; MinIO faults held {storage_faults.hold_s:.0f} s" if storage_faults else "")
        )
        random_run = run_fio(
            "random writes, verified while running",
            fio_job(
                "soak-random",
                target / "random.dat",
                "--rw=randwrite",
                "--bs=4k",
                f"--size={RANDOM_FILE_MIB}M",
                "--fsync=32",
                "--verify_backlog=64",
                "--time_based",
                f"--runtime={int(duration)}",
            ),
            duration + FIO_SLACK_S,
        )
        killer.stopped.set()
        if kill_every > 0:
            killer.join(130)
        if faults is not None and probe is not None:
            faults.stopped.set()
            # A fault under way is finished: held, undone and the set healthy again.
            faults.join(faults.hold_s + 600)
            results.storage_faults = faults.records
            probe.stopped.set()
            probe.join(120)
            results.probe_error = str(probe.error or "")
        results.fio.append(random_run)
        log(f"  {random_run}")

        log(
            f"soak: phase 2, {SEQUENTIAL_FILE_MIB} MiB sequential with one kill, "
            "verified after restage"
        )
        sequential = fio_job(
            "soak-sequential",
            target / "sequential.dat",
            "--rw=write",
            "--bs=64k",
            f"--size={SEQUENTIAL_FILE_MIB}M",
            "--end_fsync=1",
        )
        midway = threading.Timer(1.0, killer.kill_once)
        midway.start()
        write_run = run_fio("sequential write", [*sequential, "--do_verify=0"], FIO_SLACK_S)
        midway.join()
        results.fio.append(write_run)
        log(f"  {write_run}")
        call_with_retry("NodeUnpublish", lambda: volume.unpublish(str(target)))
        volume.targets.remove(str(target))
        call_with_retry("NodeUnstage", volume.unstage)
        check(connected_nbd_devices() == baseline, "a device stayed attached after unstage")
        call_with_retry("NodeStage", volume.stage)
        call_with_retry("NodePublish", lambda: volume.publish(str(target)))
        verify_run = run_fio("verify after restage", [*sequential, "--verify_only"], FIO_SLACK_S)
        results.fio.append(verify_run)
        log(f"  {verify_run}")
        check(
            verify_run.read_mib >= SEQUENTIAL_FILE_MIB,
            f"verify read only {verify_run.read_mib} MiB",
        )
        clean_up_volumes(plugin)
        check(connected_nbd_devices() == baseline, "a device stayed attached at the end")
    finally:
        if faults is not None:
            faults.stopped.set()
        if probe is not None:
            probe.stopped.set()
        stop_plugin(plugin)
        if plugin.log_path.exists():
            shutil.copy(plugin.log_path, workdir.parent / f"{workdir.name}.plugin.log")
        if minio is not None:
            minio.stop()
    return results


def run(
    duration: float,
    kill_every: float,
    workdir: Path | None = None,
    results_name: str = "soak",
    log: Callable[[str], None] = print,
    storage_faults: StorageFaultPlan | None = None,
) -> dict[str, object]:
    own_workdir = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="zerofs-soak-"))
    failure: str | None = None
    results: SoakResults | None = None
    try:
        results = soak(workdir, duration, kill_every, log, storage_faults)
        if results.probe_error:
            failure = f"the pause probe's write failed: {results.probe_error}"
        failed_faults = [f for f in results.storage_faults if f.error]
        if failure is None and failed_faults:
            failure = f"{failed_faults[0].name}: {failed_faults[0].error}"
        if failure is None and storage_faults is not None:
            check(results.storage_faults, "no MinIO fault was made: the soak was too short")
        for fio in results.fio if failure is None else ():
            if fio.io_errors or fio.verify_errors or fio.returncode:
                failure = (
                    f"fio {fio.phase}: exit {fio.returncode}, {fio.io_errors} I/O errors, "
                    f"{fio.verify_errors} verification failures: {fio.error_text}"
                )
                break
        if failure is None:
            check(results.kills, "no server was killed: the soak was too short for --kill-every")
            missing = [k for k in results.kills if k.pid is None or k.restarted_in_s is None]
            check(not missing, f"kills without a server or a restart: {missing}")
    except (HarnessFailure, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    except Exception as exc:  # any other error is a failed run too, reported the same way
        failure = f"{type(exc).__name__}: {exc}"
    summary: dict[str, Any] = {
        "harness": "soak",
        "passed": failure is None,
        "failure": failure,
        **(asdict(results) if results else {"duration_s": duration, "kill_every_s": kill_every}),
    }
    path = write_results(results_name, summary)
    log_copy = workdir.parent / f"{workdir.name}.plugin.log"
    if log_copy.exists():
        shutil.move(str(log_copy), path.with_suffix(".plugin.log"))
        summary["plugin_log"] = str(path.with_suffix(".plugin.log"))
        write_results(results_name, summary)
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if failure:
        log(f"soak: FAILED: {failure}")
    else:
        kills = summary["kills"]
        log(
            f"soak: OK: {len(kills)} server kills, zero I/O errors, zero verification failures "
            f"({sum(f['written_mib'] for f in summary['fio']):.0f} MiB written)"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=float(os.environ.get("DURATION", 600)), help="seconds"
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        help="seconds between server kills (75 by default; 0, the default with --minio-set, "
        "kills none in phase 1)",
    )
    parser.add_argument(
        "--minio-set", action="store_true", help="the volume on a MinIO set, whose servers fail"
    )
    parser.add_argument("--fault-hold", type=float, default=30.0, help="seconds a fault lasts")
    parser.add_argument(
        "--fault-gap", type=float, default=20.0, help="seconds between a healed fault and the next"
    )
    parser.add_argument(
        "--drives-disk",
        type=Path,
        help="a block device for the MinIO set's drives, made ext4 for the run (its data is "
        "lost); without it they go under .cache/soak-minio",
    )
    args = parser.parse_args(argv)
    kill_every = args.kill_every
    if kill_every is None:
        kill_every = float(os.environ.get("KILL_EVERY", 0 if args.minio_set else 75))
    if args.duration < 1 or kill_every < 0 or (kill_every == 0 and not args.minio_set):
        parser.error("--duration must be at least 1 s and --kill-every positive")
    if args.drives_disk is not None and not args.minio_set:
        parser.error("--drives-disk is for --minio-set")
    name = "soak-minio" if args.minio_set else "soak"
    with contextlib.ExitStack() as stack:
        plan = None
        if args.minio_set:
            drives = MINIO_DIR
            if args.drives_disk is not None:
                drives = stack.enter_context(ext4_on(args.drives_disk))
            plan = StorageFaultPlan(args.fault_hold, args.fault_gap, drives)
        summary = run(args.duration, kill_every, results_name=name, storage_faults=plan)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
