"""Reconnects NBD devices whose connection died, before the kernel gives up on them.

The kernel reports a dead connection with a LINK_DEAD multicast message; queued I/O then
waits up to the device's dead-connection timeout for RECONFIGURE with fresh sockets. When
a volume's ZeroFS server restarts, this monitor waits for its NBD socket to answer again,
negotiates new sockets and reconfigures the device, so the workload sees a pause and no
I/O error.

A LINK_DEAD that arrives while the volume's reconnect runs makes it run once more after
it: RECONFIGURE only replaces sockets that are dead when it is sent, so a socket that
dies meanwhile needs a RECONFIGURE of its own. Every ``SWEEP_EVERY_S`` every staged
volume is reconnected as well (the kernel ignores the sockets of a device whose
connections are all alive), which repairs a notification lost to a full socket buffer.

A device whose server ended other than by its graceful shutdown may have lost writes it
acknowledged (``node.lost_writes``): such a device is disconnected instead, so that its
I/O fails rather than report lost data durable. It is checked before each attempt, and
again once a server answered and before the RECONFIGURE, which catches a server that
ended meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from zerofs_csi.errors import CsiError
from zerofs_csi.nbd.attach import DEFAULT_DEAD_CONN_TIMEOUT_S
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.node.lost_writes import WritesLost, check_writes_kept
from zerofs_csi.node.stage_record import STAGED, StageRecord, volume_of_backend
from zerofs_csi.observability.events import EventRecorder
from zerofs_csi.observability.metrics import Metrics

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.05
# A refused connection costs nothing: retry often, so that the device is reconnected
# within a quarter second of its restarted server listening.
MAX_RETRY_S = 0.25
# A local server answers a handshake in milliseconds; one that accepts and stays silent
# (a process that is going away) must not hold a retry for long. Each connection's
# reads are bounded by it in turn.
RECONNECT_HANDSHAKE_TIMEOUT_S = 5.0
SWEEP_EVERY_S = 30.0


class LinkMonitor:
    def __init__(
        self,
        attacher: NodeAttacher,
        staged: Callable[[], dict[str, StageRecord]],
        metrics: Metrics,
        give_up_after_s: float = DEFAULT_DEAD_CONN_TIMEOUT_S,
        events: EventRecorder | None = None,
    ) -> None:
        self._attacher = attacher
        self._staged = staged
        self._metrics = metrics
        self._events = events  # the plugin's; the link keeper only logs
        self._give_up_after_s = give_up_after_s
        self._lock = threading.Lock()
        self._dead: dict[str, float] = {}  # volume id -> when its link was reported dead
        self._running: set[str] = set()  # volumes whose reconnect thread runs
        self._again: set[str] = set()  # reported dead while their reconnect ran
        self._failed: set[tuple[str, int]] = set()  # (volume, device) failed for lost writes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_dead(self, volume_id: str) -> bool:
        with self._lock:
            return volume_id in self._dead

    def forget(self, volume_id: str) -> None:
        """The volume was unstaged: what was known of its device's link goes with it (a
        link given up on, or failed for lost writes, stays reported dead until then)."""
        with self._lock:
            self._dead.pop(volume_id, None)
            self._failed = {key for key in self._failed if key[0] != volume_id}
            self._metrics.nbd_dead_links.labels(self._metrics.node).set(len(self._dead))

    def start(self) -> None:
        """Listen for LINK_DEAD, then reconnect every staged volume once.

        A LINK_DEAD sent while no listener was subscribed (the plugin was down when the
        server restarted) is lost, and the device would fail its I/O once the dead
        connection timeout ran out. The kernel ignores RECONFIGURE for a device whose
        connections are all alive, so the sweep costs a handshake per volume.
        """
        listener = self._attacher.nbd.link_dead_listener()  # subscribed from here on
        self._thread = threading.Thread(
            target=self._listen, args=(listener,), name="link-monitor", daemon=True
        )
        self._thread.start()
        self._on_dead(-1, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _listen(self, listener: object) -> None:
        receive = listener.receive  # type: ignore[attr-defined]
        sweep_at = time.monotonic() + SWEEP_EVERY_S
        try:
            while not self._stop.is_set():
                for index, backend_id in receive(0.5):
                    self._on_dead(index, backend_id)
                if time.monotonic() >= sweep_at:
                    sweep_at = time.monotonic() + SWEEP_EVERY_S
                    self._on_dead(-1, None, reported=False)
        finally:
            listener.close()  # type: ignore[attr-defined]

    def _on_dead(self, index: int, backend_id: str | None, reported: bool = True) -> None:
        """Reconnect the volume of ``nbd<index>``, or every staged volume for index -1.
        ``reported``: the link is known dead (it shows in is_dead until reconnected)."""
        if index >= 0:
            log.info("NBD link dead", extra={"device": f"nbd{index}", "backend_id": backend_id})
        staged = {vid: r for vid, r in self._staged().items() if r.phase == STAGED}
        if index < 0:
            # Notifications were lost: try every staged volume; RECONFIGURE is ignored by
            # the kernel for devices whose connections are all alive.
            targets = list(staged.values())
        else:
            vid = volume_of_backend(backend_id or "")
            record = staged.get(vid) if vid else None
            if record is None or record.device_index != index:
                return  # not a device of a volume staged here
            targets = [record]
        for record in targets:
            vid = record.volume_id
            with self._lock:
                if reported and vid not in self._dead:
                    self._dead[vid] = time.monotonic()
                    self._metrics.nbd_dead_links.labels(self._metrics.node).set(len(self._dead))
                if vid in self._running:
                    if index >= 0:
                        self._again.add(vid)
                    continue
                self._running.add(vid)
            threading.Thread(
                target=self._reconnect,
                args=(record, reported),
                name=f"reconnect-{record.volume_id}",
                daemon=True,
            ).start()

    def _reconnect(self, record: StageRecord, reported: bool) -> None:
        vid = record.volume_id
        try:
            again = reported
            if not reported:
                self._sweep_one(record)
                with self._lock:
                    again = vid in self._again  # reported dead during the sweep
                    self._again.discard(vid)
            while again and not self._stop.is_set():
                result = self._reconnect_once(record)
                with self._lock:
                    again = result == "ok" and vid in self._again
                    self._again.discard(vid)
        finally:
            with self._lock:
                self._running.discard(vid)

    def _sweep_one(self, record: StageRecord) -> None:
        """One RECONFIGURE with fresh sockets; the kernel keeps them only for dead
        connections. A server that does not answer is left to LINK_DEAD or the next sweep."""
        try:
            check_writes_kept(record)
            self._attacher.reconnect(
                record.device_index,
                record.backend_id,
                record.nbd_socket,
                record.volume_id,
                record.connections,
                RECONNECT_HANDSHAKE_TIMEOUT_S,
                before_reconfigure=lambda: check_writes_kept(record),
            )
        except WritesLost as exc:
            self._fail_device(record, exc.message)
        except CsiError as exc:
            log.debug(
                "link sweep: no reconnect",
                extra={"volume_id": record.volume_id, "error": exc.message},
            )

    def _reconnect_once(self, record: StageRecord) -> str:
        vid = record.volume_id
        node = self._metrics.node
        started = time.monotonic()
        delay = FIRST_RETRY_S
        result = "failed"
        try:
            while not self._stop.is_set():
                try:
                    # A server known to have ended uncleanly fails the device at once
                    # (the other link monitor may have disconnected it already); the
                    # check after the handshake catches a server that ended since.
                    check_writes_kept(record)
                    self._attacher.reconnect(
                        record.device_index,
                        record.backend_id,
                        record.nbd_socket,
                        vid,
                        record.connections,
                        RECONNECT_HANDSHAKE_TIMEOUT_S,
                        before_reconfigure=lambda: check_writes_kept(record),
                    )
                except WritesLost as exc:
                    result = "writes_lost"
                    self._fail_device(record, exc.message)
                    return result
                except CsiError as exc:
                    current = self._staged().get(vid)
                    if current is None or current.device_index != record.device_index:
                        # Unstaged (or staged again on another device) meanwhile.
                        result = "abandoned"
                        log.info(
                            "reconnect abandoned: volume no longer staged there",
                            extra={"volume_id": vid, "device": record.device},
                        )
                        return result
                    if time.monotonic() - started > self._give_up_after_s:
                        log.error(
                            "reconnect gave up",
                            extra={"volume_id": vid, "error": exc.message},
                        )
                        return result
                    # The first failure says why; the retries that follow it every
                    # MAX_RETRY_S while the server restarts go to the debug log.
                    (log.info if delay == FIRST_RETRY_S else log.debug)(
                        "reconnect attempt failed; retrying",
                        extra={"volume_id": vid, "error": exc.message, "retry_in": delay},
                    )
                    self._stop.wait(delay)
                    delay = min(delay * 2, MAX_RETRY_S)
                    continue
                result = "ok"
                log.info(
                    "reconnected",
                    extra={
                        "volume_id": vid,
                        "device": record.device,
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )
                return result
            return result
        finally:
            if result not in ("abandoned", "writes_lost"):  # the latter counted once
                self._metrics.reconnects.labels(node, result).inc()
            # A link we gave up on, or failed, stays reported dead.
            if result not in ("failed", "writes_lost"):
                with self._lock:
                    self._dead.pop(vid, None)
                    self._metrics.nbd_dead_links.labels(node).set(len(self._dead))

    def _fail_device(self, record: StageRecord, message: str) -> None:
        """Disconnect the device of a server that may have lost its writes: the kernel
        fails the I/O it holds for a reconnect, and any later. Counted and logged once."""
        key = (record.volume_id, record.device_index)
        with self._lock:
            if key in self._failed:
                return
        try:
            self._attacher.detach(record.device_index, record.backend_id)
        except CsiError as exc:
            log.error(
                "disconnecting a device whose server may have lost its writes failed; "
                "retrying at the next sweep",
                extra={"volume_id": record.volume_id, "error": exc.message},
            )
            return
        with self._lock:
            self._failed.add(key)
        self._metrics.reconnects.labels(self._metrics.node, "writes_lost").inc()
        log.error(message, extra={"volume_id": record.volume_id, "device": record.device})
        if self._events is not None:
            # On the volume's PersistentVolume (the record keeps no claim name).
            self._events.warning(record.volume_id, "WritesLost", message, {})
