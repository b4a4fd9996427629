"""A transaction of side effects: each step registers its undo; a failure undoes in reverse."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Transaction:
    """Use as a context manager; call ``commit`` once every step succeeded.

    Leaving the block with an exception before ``commit`` runs the registered undos
    newest first. An undo that fails is logged and the rest still run; the original
    exception is what propagates.
    """

    def __init__(self, name: str, **log_fields: object) -> None:
        self._name = name
        self._fields = log_fields
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._committed = False

    def on_undo(self, step: str, undo: Callable[[], object]) -> None:
        self._undo.append((step, undo))

    def commit(self) -> None:
        self._committed = True
        self._undo.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or self._committed:
            return
        for step, undo in reversed(self._undo):
            try:
                undo()
            except Exception:
                log.exception(
                    "undo failed", extra={**self._fields, "transaction": self._name, "step": step}
                )
            else:
                log.info("undone", extra={**self._fields, "transaction": self._name, "step": step})
        self._undo.clear()
