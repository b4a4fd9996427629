"""Which free NBD device index an attach asks CONNECT for.

The kernel would pick the lowest free index, which is usually the one freed last (by us,
nbd-client or anyone): udev is then about to open it for the teardown's change event,
and its probe would run on the new device, holding the disk lock that readiness waits
for, or make a named index EBUSY. So free indexes are named in rotation instead,
starting after the last one connected (the longest idle come first), skipping what was
detached in the last seconds and what concurrent attaches claimed; the kernel's choice
comes last.

Devices last connected with as many hardware queues as the new connection count gets
(one per connection, at most one per CPU) come first: their request queue kept that
count, and starting a device whose queue count changes freezes its queue once more
(nbd_start_device calls blk_mq_update_nr_hw_queues), a wait of a whole RCU grace period.
A device never connected has one hardware queue.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable

from zerofs_csi.nbd.tuning import hardware_queues_for

# How long after a detach its index is avoided (udev's probe of the teardown event),
# and how many named free indexes to try before letting the kernel pick.
COOLDOWN_S = 2.0
NAMED_INDEX_TRIES = 3


class IndexChooser:
    """What one attacher knows of the indexes it used: the last one connected, the
    connection count of each, when each was detached, which are claimed by attaches in
    flight. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[int, int] = {}
        self._detached_at: dict[int, float] = {}
        self._claimed: set[int | None] = set()
        self._rotor = -1  # the index the last attach got: named candidates start after it

    def candidates(self, free: list[int], connections: int) -> list[int | None]:
        """Indexes to ask CONNECT for, in order, from ``free`` (sorted; a stale STATUS
        answer only costs an EBUSY retry), then None: the kernel's choice. The named
        ones are claimed until :meth:`release`."""
        now = time.monotonic()
        queues = hardware_queues_for(connections)
        matching: list[int | None] = []
        others: list[int | None] = []
        with self._lock:
            for cooled in [i for i, t in self._detached_at.items() if now - t > COOLDOWN_S]:
                del self._detached_at[cooled]
            start = bisect.bisect_right(free, self._rotor)
            for position in range(len(free)):
                candidate = free[(start + position) % len(free)]
                if candidate in self._detached_at or candidate in self._claimed:
                    continue
                if hardware_queues_for(self._connections.get(candidate, 1)) == queues:
                    matching.append(candidate)
                    if len(matching) == NAMED_INDEX_TRIES:
                        break
                elif len(others) < NAMED_INDEX_TRIES:
                    others.append(candidate)
            picked = (matching + others)[:NAMED_INDEX_TRIES]
            self._claimed.update(picked)
        picked.append(None)
        return picked

    def release(self, candidates: Iterable[int | None]) -> None:
        with self._lock:
            self._claimed.difference_update(candidates)

    def connected(self, index: int, connections: int) -> None:
        with self._lock:
            self._connections[index] = connections
            self._rotor = index

    def detached(self, index: int) -> None:
        with self._lock:
            self._detached_at[index] = time.monotonic()

    def connections_of(self, index: int, default: int) -> int:
        """The connection count ``index`` was last connected with here, else ``default``."""
        with self._lock:
            return self._connections.get(index, default)
