"""Per-volume try-locks: a second operation on a busy volume is ABORTED at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from zerofs_csi.errors import Aborted


class VolumeLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: dict[str, str] = {}

    @contextmanager
    def hold(self, volume_id: str, operation: str) -> Iterator[None]:
        """Hold the volume for ``operation``; raise Aborted if another operation has it."""
        with self._guard:
            current = self._busy.get(volume_id)
            if current is not None:
                raise Aborted(f"volume {volume_id} is busy with {current}; retry after it finishes")
            self._busy[volume_id] = operation
        try:
            yield
        finally:
            with self._guard:
                del self._busy[volume_id]

    def busy(self) -> dict[str, str]:
        with self._guard:
            return dict(self._busy)
