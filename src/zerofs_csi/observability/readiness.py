"""What Probe answers: not ready until the start-up checks have run and passed."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class State(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Check:
    """A named start-up check: returns None when fine, or what is wrong and what to do."""

    name: str
    run: Callable[[], str | None]


class Readiness:
    def __init__(self, checks: list[Check]) -> None:
        self._checks = list(checks)
        self._lock = threading.Lock()
        self._state = State.PENDING if self._checks else State.READY
        self._problem = ""

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def problem(self) -> str:
        with self._lock:
            return self._problem

    def run_checks(self) -> State:
        """Run every check in order; the first failure decides. Safe to call again."""
        for check in self._checks:
            try:
                problem = check.run()
            except Exception as exc:
                log.exception("readiness check %s raised", check.name)
                problem = f"{check.name} check raised {type(exc).__name__}: {exc}"
            if problem:
                log.error("not ready: %s", problem, extra={"check": check.name})
                with self._lock:
                    self._state, self._problem = State.FAILED, problem
                return State.FAILED
        with self._lock:
            self._state, self._problem = State.READY, ""
        log.info("ready", extra={"checks": [c.name for c in self._checks]})
        return State.READY

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_checks, name="readiness", daemon=True)
        thread.start()
        return thread
