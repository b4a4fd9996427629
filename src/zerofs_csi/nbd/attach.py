"""Attach ZeroFS NBD exports as /dev/nbdX in-process, and detach them again.

The node service builds one :class:`NbdAttacher` and calls it from any thread. The work
happens in :mod:`zerofs_csi.nbd._nbd` (Cython, GIL released around every blocking call);
this module adds what needs Python state: a pool of resolved netlink sockets, one
attach at a time per backend id, ownership checks before disconnect, and the threads
that the ioctl fallback needs.

Timeouts (the defaults, and why; read from drivers/block/nbd.c of 6.1):

* A request is never abandoned to a server that is alive. With ONE connection and
  NBD_ATTR_TIMEOUT = 0, the block layer's timeout only makes the kernel log "Possible
  stuck request" and restart the timer (nbd_xmit_timeout); it requeues the request only
  when RECONFIGURE has replaced the socket it was sent on. With more than one connection
  there is no such mode: every block-layer timeout (30 s when TIMEOUT is 0, see
  nbd_set_cmd_timeout) requeues the request and shuts its socket down, though the server
  may still execute it later (a stale write), and replies already queued on that socket
  are logged as "Suspicious reply". A very large TIMEOUT does not help either: a request
  in flight on a socket whose server died is resent only at its timeout (recv_work marks
  the socket dead and leaves its requests alone), so a server crash would stall the
  writer for that long. Hence ``DEFAULT_CONNECTIONS = 1``.
* ``REQUEUE_TICK_MS = 1000`` (the queue's ``io_timeout`` in sysfs, one connection only):
  how often the kernel looks at requests still in flight. After a server crash and the
  reconnect, the requests lost with the old socket are resent at the next tick: a crash
  costs the server's restart plus about a second. The block layer rounds timers up to
  whole seconds, so a smaller tick gains nothing.
* ``MULTI_CONN_IO_TIMEOUT_S = 30``: the kernel's own timeout when several connections are
  asked for (a StorageClass's choice): a crash stalls in-flight requests that long, and
  a server silent for that long has its requests requeued.
* ``dead_conn_timeout_s = 300`` (NBD_ATTR_DEAD_CONN_TIMEOUT): once no connection of a
  device is alive, new I/O waits this long for RECONFIGURE with fresh sockets before
  failing with EIO. It must cover a ZeroFS restart (process or pod, cache warm-up) and a
  node plugin restart in between: 300 s is the reattach window ceph-csi settled on
  (ceph-csi#2204, #2394). The link keeper reconnects within a second or two of the
  server accepting connections again.
* A server that is alive but answers nothing is the driver's business, not the
  kernel's: its supervisor probes it with a handshake and restarts it after a long,
  configurable window (``process_backend``); the dead connection then reconnects.
"""

from __future__ import annotations

import bisect
import errno
import functools
import os
import threading
import time
from dataclasses import dataclass, field

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
from zerofs_csi.nbd.limits import DEFAULT_CONNECTIONS, MAX_CONNECTIONS

__all__ = [
    "DEFAULT_CONNECTIONS",
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
    "set_requeue_tick",
    "list_exports",
]

MULTI_CONN_IO_TIMEOUT_S = 30
REQUEUE_TICK_MS = 1000
DEFAULT_DEAD_CONN_TIMEOUT_S = 300
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_READY_TIMEOUT_S = 10.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
# The kernel accepts powers of two from 512 to PAGE_SIZE (4096 on x86-64 and arm64).
_BLOCK_SIZES = (512, 1024, 2048, 4096)
# How long after a detach its index is avoided (udev's probe of the teardown event),
# and how many named free indexes to try before letting the kernel pick.
_COOLDOWN_S = 2.0
_NAMED_INDEX_TRIES = 3

ServerAddress = str | tuple[str, int]
"""A unix socket path, or ``(host, port)`` for TCP."""

_Status = tuple[list[int], list[int]]  # STATUS as (configured, free) device indexes


class MultiConnUnsupported(NbdError):
    """Several connections were asked for but the server does not advertise
    CAN_MULTI_CONN (errno EINVAL)."""


class DiskLock:
    """An open read-only descriptor of the whole disk holding LOCK_EX: udev postpones its
    probe until it is released. Hold it across mkfs and mount."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DiskLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@dataclass(frozen=True)
class Device:
    """A connected NBD device serving ``backend_id``."""

    index: int
    path: str
    size_bytes: int
    backend_id: str
    lock: DiskLock | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DeviceInfo:
    """What sysfs says about a configured NBD device."""

    index: int
    backend_id: str | None
    size_bytes: int
    pid: int | None


@dataclass
class _IoctlSession:
    device: _nbd.IoctlDevice
    backend_id: str
    size_bytes: int
    thread: threading.Thread
    error: BaseException | None = None


def io_timeout_for(connections: int) -> int:
    """NBD_ATTR_TIMEOUT for a device of ``connections`` sockets: 0 (never abandon a
    request) where the kernel has that mode, one connection; see the module docstring."""
    return 0 if connections == 1 else MULTI_CONN_IO_TIMEOUT_S


def _validate_attach(
    backend_id: str, connections: int, block_size: int, io_timeout_s: int, dead: int
) -> None:
    if not backend_id or "\0" in backend_id or "\n" in backend_id:
        raise ValueError(f"invalid backend id {backend_id!r}")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, got {connections}")
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"block size must be one of {_BLOCK_SIZES}, got {block_size}")
    if io_timeout_s < 0 or dead < 0:
        raise ValueError("timeouts must not be negative")


@functools.cache
def _possible_cpus() -> int:
    """nr_cpu_ids: the block layer gives a device at most this many hardware queues."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            ranges = f.read().strip()
        return max(int(r.split("-")[-1]) for r in ranges.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def hardware_queues_for(connections: int) -> int:
    """How many hardware queues the kernel gives a device connected with ``connections``
    sockets (one per connection, capped at the number of possible CPUs)."""
    return min(connections, _possible_cpus())


def _block_size_for(requested: int, negotiated: _nbd.Negotiated) -> int:
    """The requested block size, raised to the server's minimum when it states one."""
    minimum = negotiated.min_block_size
    if minimum <= requested:
        return requested
    for size in _BLOCK_SIZES:
        if size >= minimum:
            return size
    raise NbdError(
        errno.EINVAL,
        f"the server's minimum block size {minimum} exceeds what the kernel supports",
    )


def set_requeue_tick(index: int, tick_ms: int = REQUEUE_TICK_MS) -> None:
    """Have the kernel look at the requests of ``nbd<index>`` still in flight every
    ``tick_ms`` (the queue's io_timeout; with NBD_ATTR_TIMEOUT 0 and one connection a
    look only requeues what was sent on a socket RECONFIGURE has since replaced)."""
    with open(f"/sys/block/nbd{index}/queue/io_timeout", "w") as f:
        f.write(str(tick_ms))


class _PooledNetlink:
    """Borrow a socket from an attacher's pool for the duration of a ``with`` block."""

    __slots__ = ("_owner", "_sock")

    def __init__(self, owner: NbdAttacher) -> None:
        self._owner = owner
        self._sock: _nbd.NbdNetlink | None = None

    def __enter__(self) -> _nbd.NbdNetlink:
        self._sock = self._owner._take_socket()
        return self._sock

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._owner._give_socket(self._sock)
            self._sock = None


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
        self._prototype: _nbd.NbdNetlink | None = None
        self._pool: list[_nbd.NbdNetlink] = []
        self._backend_locks: dict[str, threading.Lock] = {}
        self._ioctl_sessions: dict[int, _IoctlSession] = {}
        self._connections: dict[int, int] = {}
        self._detached_at: dict[int, float] = {}
        # Devices disconnected while something still held them open: (pid, backend) as
        # sysfs showed them, until the kernel releases the configuration.
        self._disconnecting: dict[int, tuple[str, str | None]] = {}
        self._claimed: set[int | None] = set()  # named indexes of attaches in flight
        self._rotor = -1  # the index the last attach got: named candidates start after it
        # Handshake flags each server offered last time: the next handshake sends its
        # client flags and NBD_OPT_GO without waiting for the greeting.
        self._handshake_flags: dict[ServerAddress, int] = {}

    # -- plumbing -------------------------------------------------------------------

    def _netlink(self) -> _PooledNetlink:
        """A pooled netlink socket for one request sequence (``with``)."""
        return _PooledNetlink(self)

    def _take_socket(self) -> _nbd.NbdNetlink:
        with self._lock:
            if self._pool:
                return self._pool.pop()
            if self._prototype is None:
                self._prototype = _nbd.NbdNetlink()
                return self._prototype
            return self._prototype.clone()

    def _give_socket(self, sock: _nbd.NbdNetlink) -> None:
        with self._lock:
            self._pool.append(sock)

    def _backend_lock(self, backend_id: str) -> threading.Lock:
        """The lock that serializes attach, detach and reconnect of one backend id."""
        with self._lock:
            return self._backend_locks.setdefault(backend_id, threading.Lock())

    def close(self) -> None:
        """Close the pooled netlink sockets (devices stay attached)."""
        with self._lock:
            for sock in self._pool:
                sock.close()
            self._pool.clear()
            self._prototype = None

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
        if backend is None and index in self._ioctl_sessions:
            backend = self._ioctl_sessions[index].backend_id
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
        return sorted(
            int(name[3:])
            for name in os.listdir("/sys/block")
            if name.startswith("nbd") and name[3:].isdigit()
        )

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
            for index, session in self._ioctl_sessions.items():
                if session.backend_id == backend_id and session.thread.is_alive():
                    return Device(index, self._path(index), session.size_bytes, backend_id)
            return None
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
    ) -> Device:
        """Negotiate ``export_name`` on ``connections`` sockets to ``server`` and connect
        them as an NBD device tagged with ``backend_id``; return it ready for use.

        Idempotent per backend id: when a device already serves ``backend_id`` it is
        returned and nothing new is connected (one attach per backend id runs at a time
        in this object). With ``keep_lock`` the returned device carries a
        :class:`DiskLock` that keeps udev from probing until released.

        Raises ExportNotFound, HandshakeError, MultiConnUnsupported (server lacks
        CAN_MULTI_CONN), NbdModuleNotLoaded, NbdPermissionError, DeviceBusy (explicit
        ``index`` in use), DeviceNotReady. ``io_timeout_s`` None is
        :func:`io_timeout_for` ``connections``.
        """
        if io_timeout_s is None:
            io_timeout_s = io_timeout_for(connections)
        _validate_attach(backend_id, connections, block_size, io_timeout_s, dead_conn_timeout_s)
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
                        watch=watch,
                        candidates=candidates,
                    )
            finally:
                handshake.close()
                if watch is not None:
                    watch.close()
                if index is None and candidates:
                    with self._lock:
                        self._claimed.difference_update(candidates)

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
        bsize = _block_size_for(block_size, negotiated)
        if self.use_ioctl:
            new_index = self._ioctl_connect(negotiated, bsize, io_timeout_s, backend_id, index)
        else:
            new_index = self._netlink_connect(
                negotiated, bsize, io_timeout_s, dead_conn_timeout_s, backend_id, index, candidates
            )
        try:
            if io_timeout_s == 0:
                set_requeue_tick(new_index)
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
            self._connections[new_index] = connections
            self._rotor = new_index
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
                        server_flags=negotiated.transmission_flags,
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
        """Which indexes to ask CONNECT for, in order; None lets the kernel pick.

        The kernel would pick the lowest free index, which is usually the one freed last
        (by us, nbd-client or anyone): udev is then about to open it for the teardown's
        change event, and its probe would run on the new device, holding the disk lock
        that readiness waits for, or make a named index EBUSY. So name free indexes in
        rotation instead, starting after the last one this object used (the longest
        idle come first), skipping what this object detached in the last seconds and
        what concurrent attaches claimed; the kernel's choice comes last. ``status`` is
        a STATUS answer the caller already has (a stale one only costs an EBUSY retry).

        Devices this object last connected with as many hardware queues as ``connections``
        sockets get (one per connection, at most one per CPU) come first: their request
        queue kept that count, and starting a device whose queue count changes freezes
        its queue once more (nbd_start_device calls blk_mq_update_nr_hw_queues), a wait
        of a whole RCU grace period. A device never connected has one hardware queue.
        Named indexes are claimed; the caller releases them from ``_claimed``."""
        if index is not None:
            return [index]
        if status is None:
            status = self._status()
        free = status[1]
        now = time.monotonic()
        queues = hardware_queues_for(connections)
        matching: list[int | None] = []
        others: list[int | None] = []
        with self._lock:
            for cooled in [i for i, t in self._detached_at.items() if now - t > _COOLDOWN_S]:
                del self._detached_at[cooled]
            start = bisect.bisect_right(free, self._rotor)
            for position in range(len(free)):
                candidate = free[(start + position) % len(free)]
                if candidate in self._detached_at or candidate in self._claimed:
                    continue
                if hardware_queues_for(self._connections.get(candidate, 1)) == queues:
                    matching.append(candidate)
                    if len(matching) == _NAMED_INDEX_TRIES:
                        break
                elif len(others) < _NAMED_INDEX_TRIES:
                    others.append(candidate)
            picked = (matching + others)[:_NAMED_INDEX_TRIES]
            self._claimed.update(picked)
        picked.append(None)
        return picked

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

    def _ioctl_connect(
        self,
        negotiated: _nbd.Negotiated,
        block_size: int,
        io_timeout_s: int,
        backend_id: str,
        index: int | None,
    ) -> int:
        candidates = [index] if index is not None else self._free_ioctl_indexes()
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
                    flags=negotiated.transmission_flags,
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
            session = _IoctlSession(device, backend_id, negotiated.size_bytes, threading.Thread())
            session.thread = threading.Thread(
                target=self._ioctl_run, args=(session,), name=f"nbd{candidate}-do-it", daemon=True
            )
            with self._lock:
                self._ioctl_sessions[candidate] = session
            session.thread.start()
            return candidate
        raise DeviceBusy(errno.EBUSY, "no free NBD device for the ioctl interface")

    def _free_ioctl_indexes(self) -> list[int]:
        return [
            index
            for index in self._candidate_indexes()
            if index not in self._ioctl_sessions and _nbd.read_sysfs(index, "pid") is None
        ]

    def _ioctl_run(self, session: _IoctlSession) -> None:
        try:
            session.device.run()
        except BaseException as exc:  # reported through detach and device_info
            session.error = exc

    # -- detach ---------------------------------------------------------------------

    def _owner_check(self, index: int, backend_id: str) -> tuple[str, str] | None:
        """``(pid, backend)`` from sysfs when ``nbd<index>`` serves ``backend_id``; None
        when it is not connected (or already disconnected by us); NotOwner when it
        serves something else."""
        if self.use_ioctl:
            session = self._ioctl_sessions.get(index)
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
        session = self._ioctl_sessions.get(index) if self.use_ioctl else None
        if session is None:
            if owned is None:
                pid = _nbd.read_sysfs(index, "pid")
                owned = None if pid is None else (pid, _nbd.read_sysfs(index, "backend"))
            with self._netlink() as nl:
                nl.disconnect(index)
            with self._lock:
                self._detached_at[index] = time.monotonic()
                if owned is not None:
                    self._disconnecting[index] = owned
            return
        session.device.disconnect()
        session.device.clear_sock()
        session.thread.join(timeout=DEFAULT_READY_TIMEOUT_S)
        session.device.close()
        with self._lock:
            self._ioctl_sessions.pop(index, None)

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
    ) -> None:
        """Negotiate fresh sockets and RECONFIGURE ``nbd<index>`` with them, replacing
        its dead connections (the kernel ignores them when none is dead). ``connections``
        defaults to the count this object attached it with, else DEFAULT_CONNECTIONS; the
        kernel uses as many as it has dead connections and closes the rest. Raises
        NotOwner, NbdError(ENODEV) when the device is not connected, and the handshake
        errors."""
        if self.use_ioctl:
            raise NbdError(errno.EOPNOTSUPP, "reconnect needs the netlink interface")
        with self._backend_lock(backend_id):
            if self._owner_check(index, backend_id) is None:
                raise NbdError(errno.ENODEV, f"nbd{index} is not connected")
            count = connections or self._connections.get(index, DEFAULT_CONNECTIONS)
            handshake = self._begin_handshake(server, export_name, count, handshake_timeout_s)
            try:
                negotiated = self._finish_handshake(
                    handshake, server, export_name, count, handshake_timeout_s
                )
            finally:
                handshake.close()
            with negotiated, self._netlink() as nl:
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

    # -- LINK_DEAD ------------------------------------------------------------------

    def link_dead_listener(self) -> LinkDeadListener:
        """A new listener for LINK_DEAD notifications (``receive()`` yields
        ``(index, backend_id)``); the caller owns and closes it."""
        with self._netlink() as nl:
            return LinkDeadListener(nl.family_id, nl.mcast_group_id)
