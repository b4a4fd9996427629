"""The periodic sweep of job pods their callers gave up (Kubernetes backend): a claim or
snapshot deleted while its restore or checkpoint ran is never asked for again, so no CSI
call would remove its pod (``KubeCheckpoints.sweep_idle_jobs``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Sweeps per idle timeout: a given-up pod goes within a third more than the timeout.
SWEEPS_PER_TIMEOUT = 3


class JobSweeper:
    """Calls ``sweep(idle_seconds)`` every ``idle_seconds / 3`` on a daemon thread; a
    failed sweep is logged and the next one tries again."""

    def __init__(self, sweep: Callable[[float], list[str]], idle_seconds: float) -> None:
        self._sweep = sweep
        self._idle_seconds = idle_seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)

    def start(self) -> JobSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._idle_seconds / SWEEPS_PER_TIMEOUT):
            try:
                removed = self._sweep(self._idle_seconds)
            except Exception as exc:
                log.warning("sweeping job pods failed: %s", exc)
                continue
            if removed:
                log.info("swept job pods no call steps any more", extra={"pods": removed})
