"""Attach ZeroFS NBD exports as /dev/nbdX in-process, and detach them again.

The node service builds one :class:`NbdAttacher` and calls it from any thread. The work
happens in :mod:`zerofs_csi.nbd._nbd` (Cython, GIL released around every blocking call);
this module adds what needs Python state: a pool of resolved netlink sockets, one
attach at a time per backend id, ownership checks before disconnect, and the threads
that the ioctl fallback needs.

The pieces: :mod:`.tuning` (timeouts, block size, hardware queues, and why),
:mod:`.index_choice` (which device a new attach gets), :mod:`.netlink_pool`,
:mod:`.ioctl_sessions` (the legacy interface) and :mod:`.devices` (what is handed out).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd._nbd import (
    DeviceBusy,
    DeviceNotReady,
    ExportNotFound,
    HandshakeError,
    LinkDeadListener,
    NbdError,
    NbdModuleNotLoaded,
    NbdPermissionError,
    NetlinkError,
    NotOwner,
    list_exports,
)
from zerofs_csi.nbd.devices import Device, DeviceInfo, DiskLock
from zerofs_csi.nbd.index_choice import IndexChooser
from zerofs_csi.nbd.ioctl_sessions import IoctlSessions, sysfs_indexes
from zerofs_csi.nbd.limits import DEFAULT_CONNECTIONS, MAX_CONNECTIONS
from zerofs_csi.nbd.netlink_pool import NetlinkPool
from zerofs_csi.nbd.tuning import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DEAD_CONN_TIMEOUT_S,
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_READY_TIMEOUT_S,
    DISCONNECT_LOCK_TIMEOUT_S,
    MULTI_CONN_IO_TIMEOUT_S,
    REQUEUE_TICK_MS,
    block_size_for,
    hardware_queues_for,
    io_timeout_for,
    limit_discards,
    set_requeue_tick,
    validate_attach,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CONNECTIONS",
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_READY_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "DEFAULT_DEAD_CONN_TIMEOUT_S",
    "MULTI_CONN_IO_TIMEOUT_S",
    "REQUEUE_TICK_MS",
    "Device",
    "DeviceBusy",
    "DeviceInfo",
    "DeviceNotReady",
    "DiskLock",
    "ExportNotFound",
    "HandshakeError",
    "LinkDeadListener",
    "MultiConnUnsupported",
    "NbdAttacher",
    "NbdError",
    "NbdModuleNotLoaded",
    "NbdPermissionError",
    "NetlinkError",
    "NotOwner",
    "ServerAddress",
    "hardware_queues_for",
    "io_timeout_for",
    "limit_discards",
    "set_requeue_tick",
    "list_exports",
]

ServerAddress = str | tuple[str, int]
"""A unix socket path, or ``(host, port)`` for TCP."""

_Status = tuple[list[int], list[int]]  # STATUS as (configured, free) device indexes


class MultiConnUnsupported(NbdError):
    """Several connections were asked for but the server does not advertise
    CAN_MULTI_CONN (errno EINVAL)."""


# What a read-only device never asks of its server.
READ_ONLY_DROPPED_FLAGS = _nbd.NBD_FLAG_SEND_FLUSH | _nbd.NBD_FLAG_SEND_FUA


class NbdAttacher:
    """Attach, detach, reconnect and list NBD devices.

    Thread-safe. Owns a small pool of netlink sockets (the nbd family is resolved once,
    on first use) and, in ioctl mode, the threads blocked in NBD_DO_IT.
    ``use_ioctl`` selects the legacy ioctl interface for kernels without nbd netlink.
    """

    def __init__(self, *, use_ioctl: bool = False, dev_dir: str = "/dev") -> None:
        self.use_ioctl = use_ioctl
        self.dev_dir = dev_dir
        self._lock = threading.Lock()
        self._netlink_pool = NetlinkPool()
        self._backend_locks: dict[str, threading.Lock] = {}
        self._ioctl = IoctlSessions(dev_dir)
        self._indexes = IndexChooser()
        # Devices disconnected while something still held them open: (pid, backend) as
        # sysfs showed them, until the kernel releases the configuration.
        self._disconnecting: dict[int, tuple[str, str | None]] = {}
        # Handshake flags each server offered last time: the next handshake sends its
        # client flags and NBD_OPT_GO without waiting for the greeting.
        self._handshake_flags: dict[ServerAddress, int] = {}

    # -- plumbing -------------------------------------------------------------------

    def _netlink(self) -> AbstractContextManager[_nbd.NbdNetlink]:
        """A pooled netlink socket for one request sequence (``with``)."""
        return self._netlink_pool.borrow()

    def _backend_lock(self, backend_id: str) -> threading.Lock:
        """The lock that serializes attach, detach and reconnect of one backend id."""
        with self._lock:
            return self._backend_locks.setdefault(backend_id, threading.Lock())

    def close(self) -> None:
        """Close the pooled netlink sockets (devices stay attached)."""
        self._netlink_pool.close()

    def _path(self, index: int) -> str:
        return f"{self.dev_dir}/nbd{index}"

    # -- device facts ---------------------------------------------------------------

    def device_info(self, index: int) -> DeviceInfo | None:
        """Facts of ``nbd<index>`` while it is connected, else None."""
        pid = _nbd.read_sysfs(index, "pid")
        if pid is None:
            return None
        sectors = _nbd.read_sysfs(index, "size")
        backend = _nbd.read_sysfs(index, "backend")
        if self._disconnecting.get(index) == (pid, backend):
            # Disconnected by us; the kernel keeps pid and backend until the last opener
            # (udev's probe, typically) closes the device.
            return None
        session = self._ioctl.get(index) if backend is None else None
        if session is not None:
            backend = session.backend_id
        return DeviceInfo(
            index=index,
            backend_id=backend or None,
            size_bytes=int(sectors or 0) * 512,
            pid=int(pid),
        )

    def _status(self) -> _Status:
        with self._netlink() as nl:
            return nl.status_split()

    def _candidate_indexes(self, status: _Status | None = None) -> list[int]:
        if not self.use_ioctl:
            if status is None:
                status = self._status()
            return status[0]
        return sysfs_indexes()

    def devices(self) -> list[DeviceInfo]:
        """Every connected NBD device with its backend id (None when it has none)."""
        found = []
        for index in self._candidate_indexes():
            info = self.device_info(index)
            if info is not None:
                found.append(info)
        return found

    def find_device(self, backend_id: str) -> Device | None:
        """The connected device serving ``backend_id``, or None."""
        return self._find(backend_id, None)

    def _find(self, backend_id: str, status: _Status | None) -> Device | None:
        if self.use_ioctl:
            found = self._ioctl.find(backend_id)
            if found is None:
                return None
            index, session = found
            return Device(index, self._path(index), session.size_bytes, backend_id)
        remaining = self._candidate_indexes(status)
        while remaining:
            # The backend files of every configured device in one call.
            index = _nbd.find_backend(remaining, backend_id)
            if index < 0:
                return None
            info = self.device_info(index)
            if info is not None and info.backend_id == backend_id:
                return Device(index, self._path(index), info.size_bytes, backend_id)
            remaining = remaining[remaining.index(index) + 1 :]
        return None

    # -- attach ---------------------------------------------------------------------

    def attach(
        self,
        server: ServerAddress,
        export_name: str,
        backend_id: str,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        io_timeout_s: int | None = None,
        dead_conn_timeout_s: int = DEFAULT_DEAD_CONN_TIMEOUT_S,
        index: int | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        keep_lock: bool = False,
        read_only: bool = False,
    ) -> Device:
        """Negotiate ``export_name`` on ``connections`` sockets to ``server`` and connect
        them as an NBD device tagged with ``backend_id``; return it ready for use.

        Idempotent per backend id: when a device already serves ``backend_id`` it is
        returned and nothing new is connected (one attach per backend id runs at a time
        in this object). With ``keep_lock`` the returned device carries a
        :class:`DiskLock` that keeps udev from probing until released. With
        ``read_only`` the kernel makes the device read-only whatever the server offers
        (NBD_FLAG_READ_ONLY joins the server's flags it is given, and it sends no
        flushes).

        Raises ExportNotFound, HandshakeError, MultiConnUnsupported (server lacks
        CAN_MULTI_CONN), NbdModuleNotLoaded, NbdPermissionError, DeviceBusy (explicit
        ``index`` in use), DeviceNotReady. ``io_timeout_s`` None is
        :func:`io_timeout_for` ``connections``.
        """
        if io_timeout_s is None:
            io_timeout_s = io_timeout_for(connections)
        validate_attach(backend_id, connections, block_size, io_timeout_s, dead_conn_timeout_s)
        with self._backend_lock(backend_id):
            try:
                # Connect first: the server accepts and greets while we look for an
                # existing device and open the uevent socket.
                handshake = self._begin_handshake(
                    server, export_name, connections, handshake_timeout_s
                )
            except HandshakeError:
                existing, _status = self._existing(backend_id)
                if existing is None:
                    raise
                return self._ready(existing, ready_timeout_s, None, keep_lock)
            watch: _nbd.UeventWatch | None = None
            candidates: list[int | None] = []
            try:
                existing, status = self._existing(backend_id)
                if existing is not None:
                    handshake.close()
                    return self._ready(existing, ready_timeout_s, None, keep_lock)
                if self.use_ioctl:
                    watch = _nbd.UeventWatch()
                else:
                    candidates = self._index_candidates(index, status, connections)
                with self._finish_handshake(
                    handshake, server, export_name, connections, handshake_timeout_s
                ) as negotiated:
                    return self._connect(
                        negotiated,
                        server,
                        export_name,
                        backend_id,
                        connections=connections,
                        block_size=block_size,
                        io_timeout_s=io_timeout_s,
                        dead_conn_timeout_s=dead_conn_timeout_s,
                        index=index,
                        ready_timeout_s=ready_timeout_s,
                        keep_lock=keep_lock,
                        read_only=read_only,
                        watch=watch,
                        candidates=candidates,
                    )
            finally:
                handshake.close()
                if watch is not None:
                    watch.close()
                if index is None and candidates:
                    self._indexes.release(candidates)

    def _begin_handshake(
        self, server: ServerAddress, export_name: str, connections: int, timeout_s: float
    ) -> _nbd.Handshake:
        assumed = self._handshake_flags.get(server, -1)
        return _nbd.Handshake(server, export_name, connections, timeout_s, assumed)

    def _finish_handshake(
        self,
        handshake: _nbd.Handshake,
        server: ServerAddress,
        export_name: str,
        connections: int,
        timeout_s: float,
    ) -> _nbd.Negotiated:
        try:
            negotiated = handshake.finish()
        except HandshakeError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            # The server at this address changed: negotiate again without sending ahead.
            self._handshake_flags.pop(server, None)
            negotiated = _nbd.negotiate(server, export_name, connections, timeout_s)
        self._handshake_flags[server] = negotiated.handshake_flags
        return negotiated

    def _connect(
        self,
        negotiated: _nbd.Negotiated,
        server: ServerAddress,
        export_name: str,
        backend_id: str,
        *,
        connections: int,
        block_size: int,
        io_timeout_s: int,
        dead_conn_timeout_s: int,
        index: int | None,
        ready_timeout_s: float,
        keep_lock: bool,
        read_only: bool,
        watch: _nbd.UeventWatch | None,
        candidates: list[int | None],
    ) -> Device:
        if connections > 1 and not negotiated.can_multi_conn:
            raise MultiConnUnsupported(
                errno.EINVAL,
                f"NBD server {server!r} does not advertise CAN_MULTI_CONN for "
                f"export {export_name!r}: attach it with connections=1",
            )
        size = negotiated.size_bytes
        bsize = block_size_for(block_size, negotiated)
        flags = negotiated.transmission_flags
        if read_only:
            # ZeroFS 2.3 never offers READ_ONLY, not even serving a checkpoint, and its
            # read-only servers fail flushes (EIO): a read-only device sends none.
            flags = (flags | _nbd.NBD_FLAG_READ_ONLY) & ~READ_ONLY_DROPPED_FLAGS
        if self.use_ioctl:
            new_index = self._ioctl.connect(
                negotiated, flags, bsize, io_timeout_s, backend_id, index
            )
        else:
            new_index = self._netlink_connect(
                negotiated,
                flags,
                bsize,
                io_timeout_s,
                dead_conn_timeout_s,
                backend_id,
                index,
                candidates,
            )
        try:
            if io_timeout_s == 0:
                set_requeue_tick(new_index)
            limit_discards(new_index)
            # Straight after CONNECT, before any bookkeeping: udevd got the change event
            # during the call, and whoever locks the disk first makes the other wait.
            # CONNECT answers only after the kernel started the device, which set the
            # capacity and sent that event in the same call, so on this path the capacity
            # check proves the event; only DO_IT needs the watch.
            lock_fd = _nbd.wait_ready(
                new_index,
                size,
                ready_timeout_s,
                watch=watch if self.use_ioctl else None,
                keep_lock=keep_lock,
                dev_dir=self.dev_dir,
            )
        except BaseException:
            negotiated.close()
            self._disconnect(new_index)
            raise
        # The kernel holds its own references to the sockets now.
        negotiated.close()
        with self._lock:
            self._disconnecting.pop(new_index, None)
        self._indexes.connected(new_index, connections)
        return Device(
            new_index,
            self._path(new_index),
            size,
            backend_id,
            None if lock_fd is None else DiskLock(lock_fd),
        )

    def _netlink_connect(
        self,
        negotiated: _nbd.Negotiated,
        server_flags: int,
        block_size: int,
        io_timeout_s: int,
        dead_conn_timeout_s: int,
        backend_id: str,
        index: int | None,
        candidates: list[int | None],
    ) -> int:
        with self._netlink() as nl:
            for candidate in candidates:
                try:
                    return nl.connect(
                        negotiated.socket_fds,
                        negotiated.size_bytes,
                        block_size=block_size,
                        server_flags=server_flags,
                        timeout_s=io_timeout_s,
                        dead_conn_timeout_s=dead_conn_timeout_s,
                        backend_id=backend_id,
                        index=candidate,
                    )
                except DeviceBusy:
                    if candidate is None or candidate == index:
                        raise
        raise DeviceBusy(errno.EBUSY, "no NBD device could be connected")

    def _index_candidates(
        self, index: int | None, status: _Status | None, connections: int = 1
    ) -> list[int | None]:
        """Which indexes to ask CONNECT for, in order (None lets the kernel pick): the
        one asked for, else :class:`IndexChooser`'s choice among the free ones of
        ``status`` (a STATUS answer the caller already has) or of a new one. Named
        indexes are claimed; the caller releases them."""
        if index is not None:
            return [index]
        if status is None:
            status = self._status()
        return self._indexes.candidates(status[1], connections)

    def _existing(self, backend_id: str) -> tuple[Device | None, _Status | None]:
        """The device already serving ``backend_id``, and the STATUS answer used."""
        if self.use_ioctl:
            return self._find(backend_id, None), None
        status = self._status()
        return self._find(backend_id, status), status

    def _ready(
        self,
        device: Device,
        timeout_s: float,
        watch: _nbd.UeventWatch | None,
        keep_lock: bool,
    ) -> Device:
        fd = _nbd.wait_ready(
            device.index,
            device.size_bytes,
            timeout_s,
            watch=watch,
            keep_lock=keep_lock,
            dev_dir=self.dev_dir,
        )
        if fd is None:
            return device
        return Device(device.index, device.path, device.size_bytes, device.backend_id, DiskLock(fd))

    # -- detach ---------------------------------------------------------------------

    def _owner_check(self, index: int, backend_id: str) -> tuple[str, str] | None:
        """``(pid, backend)`` from sysfs when ``nbd<index>`` serves ``backend_id``; None
        when it is not connected (or already disconnected by us); NotOwner when it
        serves something else."""
        if self.use_ioctl:
            session = self._ioctl.get(index)
            if session is not None and session.thread.is_alive():
                if session.backend_id == backend_id:
                    return ("", backend_id)
                raise NotOwner(
                    errno.EPERM,
                    f"refusing to touch nbd{index}: it serves backend "
                    f"{session.backend_id!r}, not {backend_id!r}",
                )
            backend = None
        else:
            backend = _nbd.read_sysfs(index, "backend")
        pid = _nbd.read_sysfs(index, "pid")
        if pid is None or self._disconnecting.get(index) == (pid, backend):
            return None
        if backend is None:
            raise NotOwner(
                errno.EPERM,
                f"refusing to touch nbd{index}: it is connected without a backend id we "
                f"know, so it is not {backend_id!r}",
            )
        if backend != backend_id:
            raise NotOwner(
                errno.EPERM,
                f"refusing to touch nbd{index}: it serves backend {backend!r}, not {backend_id!r}",
            )
        return (pid, backend)

    def detach(self, index: int, backend_id: str) -> None:
        """Disconnect ``nbd<index>`` after checking that it serves ``backend_id``
        (the kernel's DISCONNECT checks nothing). Succeeds when it is not connected;
        raises NotOwner when it serves another backend. Returns once the kernel has shut
        the connections down; sysfs keeps ``pid`` and ``backend`` until the last opener
        (usually udev's probe of the teardown) closes the device, and this object
        reports such a device as gone."""
        with self._backend_lock(backend_id):
            owned = self._owner_check(index, backend_id)
            if owned is not None:
                self._disconnect(index, owned)

    def _disconnect(self, index: int, owned: tuple[str, str | None] | None = None) -> None:
        if self.use_ioctl and self._ioctl.get(index) is not None:
            self._ioctl.disconnect(index, join_timeout_s=DEFAULT_READY_TIMEOUT_S)
            return
        if owned is None:
            pid = _nbd.read_sysfs(index, "pid")
            owned = None if pid is None else (pid, _nbd.read_sysfs(index, "backend"))
        with self._disk_lock(index), self._netlink() as nl:
            nl.disconnect(index)
        self._indexes.detached(index)
        if owned is not None:
            with self._lock:
                self._disconnecting[index] = owned

    def _disk_lock(self, index: int) -> DiskLock:
        """The whole disk locked against udev's probe for a DISCONNECT, or, when it cannot
        be had in time (or the node is missing), a lock that holds nothing: the
        disconnect goes ahead regardless."""
        try:
            return DiskLock(_nbd.lock_disk(index, DISCONNECT_LOCK_TIMEOUT_S, self.dev_dir))
        except NbdError:
            return DiskLock(None)

    # -- reconnect ------------------------------------------------------------------

    def reconnect(
        self,
        index: int,
        backend_id: str,
        server: ServerAddress,
        export_name: str,
        *,
        connections: int | None = None,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        before_reconfigure: Callable[[], None] | None = None,
    ) -> None:
        """Negotiate fresh sockets and RECONFIGURE ``nbd<index>`` with them, replacing
        its dead connections (the kernel ignores them when none is dead). ``connections``
        defaults to the count this object attached it with, else DEFAULT_CONNECTIONS; the
        kernel uses as many as it has dead connections and closes the rest. Raises
        NotOwner, NbdError(ENODEV) when the device is not connected, and the handshake
        errors. ``before_reconfigure`` runs once the server has answered (so it sees the
        server that is connected) and may raise to leave the device as it is."""
        if self.use_ioctl:
            raise NbdError(errno.EOPNOTSUPP, "reconnect needs the netlink interface")
        with self._backend_lock(backend_id):
            if self._owner_check(index, backend_id) is None:
                raise NbdError(errno.ENODEV, f"nbd{index} is not connected")
            count = connections or self._indexes.connections_of(index, DEFAULT_CONNECTIONS)
            handshake = self._begin_handshake(server, export_name, count, handshake_timeout_s)
            try:
                negotiated = self._finish_handshake(
                    handshake, server, export_name, count, handshake_timeout_s
                )
            finally:
                handshake.close()
            with negotiated:
                if before_reconfigure is not None:
                    before_reconfigure()
                with self._netlink() as nl:
                    nl.reconfigure(index, negotiated.socket_fds, backend_id=backend_id)

    def resize(
        self,
        index: int,
        backend_id: str,
        size_bytes: int,
        *,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        """Set the capacity of ``nbd<index>`` to ``size_bytes`` (RECONFIGURE with
        NBD_ATTR_SIZE_BYTES) and wait until the block layer reports it.

        The kernel freezes the request queue for this: call it with no I/O in flight
        (freeze the filesystem first), or it can deadlock. The server must accept I/O up
        to the new size on the device's connections: a ZeroFS connection keeps the size
        it negotiated, so grow the export before connecting, or reconnect after.
        Raises NotOwner, NbdError(ENODEV) when the device is not connected."""
        if self.use_ioctl:
            raise NbdError(errno.EOPNOTSUPP, "resize needs the netlink interface")
        if size_bytes <= 0 or size_bytes % 512:
            raise ValueError(f"size must be a positive multiple of 512, got {size_bytes}")
        with self._backend_lock(backend_id):
            if self._owner_check(index, backend_id) is None:
                raise NbdError(errno.ENODEV, f"nbd{index} is not connected")
            with self._netlink() as nl:
                nl.reconfigure(index, backend_id=backend_id, size_bytes=size_bytes)
            _nbd.wait_ready(index, size_bytes, ready_timeout_s, dev_dir=self.dev_dir)
            limit_discards(index)

    # -- LINK_DEAD ------------------------------------------------------------------

    def link_dead_listener(self) -> LinkDeadListener:
        """A new listener for LINK_DEAD notifications (``receive()`` yields
        ``(index, backend_id)``); the caller owns and closes it."""
        with self._netlink() as nl:
            return LinkDeadListener(nl.family_id, nl.mcast_group_id)
