"""A pool of netlink sockets of the nbd generic family, shared by an attacher's threads.

The family is resolved once, by the first socket; the others are clones of it, so that
a request sequence never waits for another thread's nor resolves the family again.
"""

from __future__ import annotations

import threading

from zerofs_csi.nbd import _nbd


class _Borrowed:
    """A socket taken from the pool for the duration of a ``with`` block."""

    __slots__ = ("_pool", "_sock")

    def __init__(self, pool: NetlinkPool) -> None:
        self._pool = pool
        self._sock: _nbd.NbdNetlink | None = None

    def __enter__(self) -> _nbd.NbdNetlink:
        self._sock = self._pool._take()
        return self._sock

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._pool._give(self._sock)
            self._sock = None


class NetlinkPool:
    """Thread-safe; ``with pool.borrow() as nl:`` for one request sequence."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prototype: _nbd.NbdNetlink | None = None
        self._idle: list[_nbd.NbdNetlink] = []

    def borrow(self) -> _Borrowed:
        return _Borrowed(self)

    def _take(self) -> _nbd.NbdNetlink:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._prototype is None:
                self._prototype = _nbd.NbdNetlink()
                return self._prototype
            return self._prototype.clone()

    def _give(self, sock: _nbd.NbdNetlink) -> None:
        with self._lock:
            self._idle.append(sock)

    def close(self) -> None:
        """Close the idle sockets; the family is resolved again on the next borrow."""
        with self._lock:
            for sock in self._idle:
                sock.close()
            self._idle.clear()
            self._prototype = None
