"""Node-plugin start-up: bring the node back to what the stage records say.

The records in the staging directories are the source of truth. A record whose stage
never finished (the plugin died during it) is rolled back: its mount, device and server
go, so the CO's retry stages from scratch. Devices whose NBD backend id belongs to a
staged volume are kept (re-attached and re-mounted if needed);
devices whose backend id marks them as ours but whose volume is not staged are
detached; devices of other owners are never touched. Servers of volumes that are not
staged are stopped, and index entries without a record are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from zerofs_csi.errors import Aborted, CsiError
from zerofs_csi.host import mounts
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.node.lost_writes import check_writes_kept
from zerofs_csi.node.stage_record import STAGED, RecordStore, StageRecord, volume_of_backend
from zerofs_csi.node.staging import AttachedDevice, attach_staged, mount_staged
from zerofs_csi.observability.metrics import Metrics
from zerofs_csi.rpc.locks import VolumeLocks
from zerofs_csi.servers.base import VolumeServerBackend

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    kept: list[str] = field(default_factory=list)
    reattached: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    remounted: list[str] = field(default_factory=list)
    orphans_detached: list[int] = field(default_factory=list)
    servers_stopped: list[str] = field(default_factory=list)
    stale_index_entries: list[str] = field(default_factory=list)
    unrecoverable: dict[str, str] = field(default_factory=dict)


class Recovery:
    def __init__(
        self,
        records: RecordStore,
        attacher: NodeAttacher,
        backend: VolumeServerBackend,
        locks: VolumeLocks,
        metrics: Metrics,
        teardown: Callable[[StageRecord], None],
    ) -> None:
        """``teardown`` unmounts, detaches, stops the server and removes the record."""
        self._records = records
        self._teardown = teardown
        self._attacher = attacher
        self._backend = backend
        self._locks = locks
        self._metrics = metrics

    def _indexed_record(self, vid: str) -> StageRecord | None:
        path = self._records.staging_path_of(vid)
        try:
            record = self._records.read(path) if path else None
        except (ValueError, TypeError, OSError) as exc:
            log.warning("unreadable stage record", extra={"volume_id": vid, "error": str(exc)})
            return None
        return record if record is not None and record.volume_id == vid else None

    def staged_records(self, report: RecoveryReport | None = None) -> dict[str, StageRecord]:
        """The records the index points at. With ``report`` (recovery at start), index
        entries without a record are dropped, under the volume's lock: a stage running
        meanwhile writes its index entry just before its record."""
        staged: dict[str, StageRecord] = {}
        for vid in self._records.indexed_volumes():
            record = self._indexed_record(vid)
            if record is not None:
                staged[vid] = record
            elif report is not None:
                try:
                    with self._locks.hold(vid, "recovery"):
                        if self._indexed_record(vid) is None:
                            self._records.remove_index(vid)
                            report.stale_index_entries.append(vid)
                except Aborted:
                    continue
        return staged

    def run(self) -> RecoveryReport:
        report = RecoveryReport()
        staged = self.staged_records(report)

        for info in self._attacher.nbd.devices():
            vid = volume_of_backend(info.backend_id or "")
            if vid is None or vid in staged:
                continue  # somebody else's device, or one we keep
            try:
                with self._locks.hold(vid, "recovery"):
                    self._attacher.detach(info.index, info.backend_id or "")
            except Aborted:
                continue  # a stage of that volume is running right now and owns it
            report.orphans_detached.append(info.index)
            self._metrics.orphans_detached.labels(self._metrics.node).inc()
            log.info("detached orphan", extra={"volume_id": vid, "device": f"nbd{info.index}"})

        for vid, record in staged.items():
            try:
                with self._locks.hold(vid, "recovery"):
                    if record.phase == STAGED:
                        self._restore(record, report)
                    else:
                        self._teardown(record)
                        report.rolled_back.append(vid)
            except Aborted:
                continue
            except (CsiError, OSError) as exc:
                message = exc.message if isinstance(exc, CsiError) else str(exc)
                report.unrecoverable[vid] = message
                log.warning(
                    "staged volume not restored; the next NodeStageVolume will retry",
                    extra={"volume_id": vid, "error": message},
                )

        for vid in self._backend.running():
            if vid in staged:
                continue
            try:
                with self._locks.hold(vid, "recovery"):
                    self._backend.stop(vid)
            except Aborted:
                continue
            report.servers_stopped.append(vid)

        log.info("recovery done", extra={"report": dataclasses.asdict(report)})
        return report

    def _restore(self, record: StageRecord, report: RecoveryReport) -> None:
        vid = record.volume_id
        device: AttachedDevice | None = self._attacher.find_device(record.backend_id)
        if device is None:
            # Under a filesystem still mounted from it: what it cached must match.
            check_writes_kept(record)
            device = attach_staged(self._attacher, record)
            report.reattached.append(vid)
        if device.index != record.device_index or device.size_bytes != record.size_bytes:
            record = dataclasses.replace(
                record, device_index=device.index, size_bytes=device.size_bytes
            )
            self._records.write(record)
        if record.access_type == "mount":
            entry = mounts.find_mount(record.mount_path)
            if entry is None or entry.source != record.device:
                if entry is not None:
                    mounts.unmount_all(record.mount_path)
                mount_staged(record)
                report.remounted.append(vid)
        report.kept.append(vid)

    def watch_state_gauges(self) -> None:
        """Have the node's state gauges computed when they are scraped: counting devices
        and servers (an API list with the Kubernetes backend) stays off the RPC path."""
        node = self._metrics.node
        for name, gauge, count in (
            ("volumes_staged", self._metrics.volumes_staged, self._count_staged),
            ("nbd_devices", self._metrics.nbd_devices, self._count_our_devices),
            ("servers_running", self._metrics.servers_running, self._count_servers),
        ):
            gauge.labels(node).set_function(when_scraped(name, count))

    def _count_staged(self) -> int:
        return sum(1 for r in self.staged_records().values() if r.phase == STAGED)

    def _count_servers(self) -> int:
        return len(self._backend.running())

    def _count_our_devices(self) -> int:
        devices = self._attacher.nbd.devices()
        return sum(1 for d in devices if volume_of_backend(d.backend_id or ""))


def when_scraped(name: str, count: Callable[[], int]) -> Callable[[], float]:
    """``count`` as a gauge function: a failure is logged and reads as NaN, so that the
    other series of the scrape still arrive."""

    def value() -> float:
        try:
            return float(count())
        except Exception:
            log.exception("computing a gauge failed", extra={"gauge": name})
            return math.nan

    return value
