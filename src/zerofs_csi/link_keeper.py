"""The link keeper: reconnects the node's NBD devices in a process of its own.

    python -m zerofs_csi.link_keeper --state-dir DIR [--log-format json|text]

The node plugin can be gone exactly when a device needs reconnecting: killed, restarting,
or blocked in an unmount whose writes wait for that very reconnect (a process blocked in
the kernel cannot even exit). The keeper listens for LINK_DEAD and reconnects from the
stage records in ``--state-dir`` alone, so the devices come back whatever the plugin is
doing. It runs beside the plugin: the plugin starts it for the local backend (it
outlives the plugin, in a session of its own), the chart runs it as a container of the
node pod; the plugin keeps its own link monitor, and a second RECONFIGURE of a device
whose connections are alive again is ignored by the kernel. One keeper per state
directory: a second one exits at once (a lock file says which runs). It needs the host's
network namespace, where the kernel's nbd netlink family and its LINK_DEAD are.

It restarts no server: kubelet restarts a server pod, and the local backend's
supervisor runs in the plugin.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from zerofs_csi.config import LogFormat
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.node.link_monitor import LinkMonitor
from zerofs_csi.node.stage_record import RecordStore, StageRecord
from zerofs_csi.observability import logs as logsetup
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.shutdown import stop_on_signals

log = logging.getLogger(__name__)

LOCK_NAME = "link-keeper.lock"
LOG_NAME = "link-keeper.log"
# A keeper whose state directory was removed (the node's driver uninstalled, a test's
# temporary directory) has nothing left to keep and exits.
STATE_DIR_CHECK_S = 5.0


def staged_records(records: RecordStore) -> dict[str, StageRecord]:
    """The records the index points at (unreadable ones skipped: the plugin owns them)."""
    staged: dict[str, StageRecord] = {}
    for vid in records.indexed_volumes():
        path = records.staging_path_of(vid)
        try:
            record = records.read(path) if path else None
        except (ValueError, TypeError, OSError):
            continue
        if record is not None and record.volume_id == vid:
            staged[vid] = record
    return staged


def hold_lock(state_dir: Path) -> int | None:
    """The open lock file, held for the life of this process; None when another keeper
    of ``state_dir`` holds it."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def spawn(state_dir: Path, log_format: LogFormat) -> None:
    """Start a keeper for ``state_dir`` in a session of its own, without waiting for it;
    it exits at once when one runs already."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        subprocess.Popen(
            [
                sys.executable, "-m", "zerofs_csi.link_keeper",
                "--state-dir", str(state_dir), "--log-format", log_format.value,
            ],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip
    finally:
        os.close(fd)


def run(state_dir: Path, node: str = "") -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(state_dir)
    if lock is None:
        log.info(
            "a link keeper already runs for this state directory", extra={"dir": str(state_dir)}
        )
        return 0
    stop = stop_on_signals(log)
    records = RecordStore(state_dir)
    attacher = NodeAttacher(nbd.NbdAttacher())
    metrics = Metrics(node, CollectorRegistry())
    monitor = LinkMonitor(attacher, lambda: staged_records(records), metrics)
    try:
        monitor.start()
    except OSError as exc:
        log.error("cannot listen for LINK_DEAD: %s", exc)
        return 1
    log.info("link keeper running", extra={"dir": str(state_dir), "pid": os.getpid()})
    while not stop.wait(STATE_DIR_CHECK_S):
        if not state_dir.is_dir():
            log.info("state directory removed: stopping", extra={"dir": str(state_dir)})
            break
    monitor.stop()
    attacher.nbd.close()
    os.close(lock)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zerofs_csi.link_keeper", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/zerofs-csi"))
    parser.add_argument("--node-id", default=os.environ.get("NODE_ID", ""))
    parser.add_argument(
        "--log-format", type=LogFormat, choices=list(LogFormat), default=LogFormat.JSON
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    args = parser.parse_args(argv)
    if not args.state_dir.is_absolute():
        parser.error(f"--state-dir must be an absolute path: {str(args.state_dir)!r}")
    logsetup.configure(args.log_level, args.log_format)
    return run(args.state_dir, args.node_id)


if __name__ == "__main__":
    sys.exit(main())
