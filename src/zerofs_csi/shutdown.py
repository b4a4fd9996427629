"""Graceful stop of a long-running process: SIGTERM and SIGINT set an event."""

from __future__ import annotations

import logging
import signal
import threading


def stop_on_signals(log: logging.Logger) -> threading.Event:
    """Return an event that SIGTERM or SIGINT sets (logged); call from the main thread."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop
