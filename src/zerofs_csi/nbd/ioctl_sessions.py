"""The legacy ioctl interface, for kernels without nbd netlink: each device it connects
is served by a thread blocked in NBD_DO_IT until the device is disconnected.

The kernel keeps no backend id for these devices, so the sessions here are what says
which backend a device serves.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd._nbd import DeviceBusy


@dataclass
class IoctlSession:
    device: _nbd.IoctlDevice
    backend_id: str
    size_bytes: int
    thread: threading.Thread
    error: BaseException | None = None


def sysfs_indexes() -> list[int]:
    """Every NBD device the kernel has (``/sys/block/nbdN``), connected or not."""
    return sorted(
        int(name[3:])
        for name in os.listdir("/sys/block")
        if name.startswith("nbd") and name[3:].isdigit()
    )


class IoctlSessions:
    """The devices connected through the ioctl interface, by index."""

    def __init__(self, dev_dir: str) -> None:
        self.dev_dir = dev_dir
        self._lock = threading.Lock()
        self._sessions: dict[int, IoctlSession] = {}

    def get(self, index: int) -> IoctlSession | None:
        return self._sessions.get(index)

    def find(self, backend_id: str) -> tuple[int, IoctlSession] | None:
        """The live session serving ``backend_id``, with its index."""
        for index, session in list(self._sessions.items()):
            if session.backend_id == backend_id and session.thread.is_alive():
                return index, session
        return None

    def free_indexes(self) -> list[int]:
        return [
            index
            for index in sysfs_indexes()
            if index not in self._sessions and _nbd.read_sysfs(index, "pid") is None
        ]

    def connect(
        self,
        negotiated: _nbd.Negotiated,
        server_flags: int,
        block_size: int,
        io_timeout_s: int,
        backend_id: str,
        index: int | None,
    ) -> int:
        """Configure ``index`` (else the first free device) with the negotiated sockets
        and ``server_flags`` and start its NBD_DO_IT thread; DeviceBusy when none could
        be had."""
        candidates = [index] if index is not None else self.free_indexes()
        for candidate in candidates:
            try:
                device = _nbd.IoctlDevice(candidate, self.dev_dir)
            except DeviceBusy:
                continue
            try:
                device.configure(
                    negotiated.socket_fds,
                    negotiated.size_bytes,
                    block_size=block_size,
                    flags=server_flags,
                    timeout_s=io_timeout_s,
                )
            except DeviceBusy:
                device.close()
                if index is not None:
                    raise
                continue
            except BaseException:
                device.clear_sock()
                device.close()
                raise
            session = IoctlSession(device, backend_id, negotiated.size_bytes, threading.Thread())
            session.thread = threading.Thread(
                target=self._run, args=(session,), name=f"nbd{candidate}-do-it", daemon=True
            )
            with self._lock:
                self._sessions[candidate] = session
            session.thread.start()
            return candidate
        raise DeviceBusy(errno.EBUSY, "no free NBD device for the ioctl interface")

    @staticmethod
    def _run(session: IoctlSession) -> None:
        try:
            session.device.run()
        except BaseException as exc:  # reported through detach and device_info
            session.error = exc

    def disconnect(self, index: int, join_timeout_s: float) -> None:
        """Disconnect the session's device and wait up to ``join_timeout_s`` for its
        NBD_DO_IT thread to return."""
        session = self._sessions.get(index)
        if session is None:
            return
        session.device.disconnect()
        session.device.clear_sock()
        session.thread.join(timeout=join_timeout_s)
        session.device.close()
        with self._lock:
            self._sessions.pop(index, None)
