"""Kernel-facing attach path (Cython): NBD generic netlink, the NBD client handshake,
the ioctl fallback, device facts from sysfs and readiness after connect.

Every blocking call releases the GIL. Errors are OSError subclasses carrying errno.
"""

from collections.abc import Iterable, Sequence
from typing import Self

from typing_extensions import disjoint_base

NBD_CMD_CONNECT: int
NBD_CMD_DISCONNECT: int
NBD_CMD_RECONFIGURE: int
NBD_CMD_LINK_DEAD: int
NBD_CMD_STATUS: int
NBD_CFLAG_DESTROY_ON_DISCONNECT: int
NBD_CFLAG_DISCONNECT_ON_CLOSE: int
NBD_FLAG_HAS_FLAGS: int
NBD_FLAG_READ_ONLY: int
NBD_FLAG_SEND_FLUSH: int
NBD_FLAG_SEND_FUA: int
NBD_FLAG_ROTATIONAL: int
NBD_FLAG_SEND_TRIM: int
NBD_FLAG_SEND_WRITE_ZEROES: int
NBD_FLAG_CAN_MULTI_CONN: int
MAX_SOCKETS: int
NBD_MAJOR: int

ServerAddress = str | tuple[str, int]

class NbdError(OSError):
    """Base of every error raised by this module."""

class NbdModuleNotLoaded(NbdError):
    """The kernel has no ``nbd`` generic netlink family (ENOENT): ``modprobe nbd``."""

class NbdFamilyOutsideNamespace(NbdModuleNotLoaded):
    """nbd is loaded, but its netlink family exists in the host network namespace only."""

class NbdPermissionError(NbdError):
    """The caller lacks CAP_SYS_ADMIN (EPERM)."""

class DeviceBusy(NbdError):
    """The device is in use by someone else (EBUSY)."""

class NotOwner(NbdError):
    """The device serves another backend; refusing to touch it (EPERM)."""

class DeviceNotReady(NbdError):
    """The device did not become ready in time (ETIMEDOUT), or has the wrong size (EIO)."""

class NetlinkError(NbdError):
    """The kernel answered a netlink request with an error."""

    kernel_message: str | None
    """The kernel's extended-ack text, when it sent one."""

class HandshakeError(NbdError):
    """The NBD server refused or broke the handshake. errno: EACCES (policy refusal),
    EOPNOTSUPP (TLS required, option unsupported), EPROTO (bad magic, protocol
    violation), ECONNRESET (short read: the server closed), ETIMEDOUT, or the errno of
    connect (ENOENT: no socket there, ECONNREFUSED)."""

class ExportNotFound(HandshakeError):
    """The server does not know the export name (ENOENT)."""

def build_getfamily_message(seq: int, family_name: str = "nbd") -> bytes:
    """Bytes of a CTRL_CMD_GETFAMILY request (NLM_F_REQUEST | NLM_F_ACK)."""

def build_nbd_message(
    family_id: int,
    seq: int,
    cmd: int,
    *,
    index: int | None = None,
    size_bytes: int | None = None,
    block_size: int | None = None,
    timeout_s: int | None = None,
    dead_conn_timeout_s: int | None = None,
    server_flags: int | None = None,
    client_flags: int | None = None,
    socket_fds: Iterable[int] = (),
    backend_id: str | None = None,
) -> bytes:
    """Bytes of an nbd generic netlink request, exactly as this module sends it."""

def decode_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split netlink bytes into ``(type, flags, seq, payload)``; ValueError if truncated."""

def decode_error(payload: bytes, flags: int = 0) -> tuple[int, str | None]:
    """An NLMSG_ERROR payload as ``(errno, extended_ack_message)``; errno 0 is an ack."""

def decode_genl_command(payload: bytes) -> int:
    """The generic netlink command byte of a payload."""

def decode_family(payload: bytes) -> tuple[int, dict[str, int]]:
    """A CTRL_CMD_NEWFAMILY payload as ``(family_id, {group_name: group_id})``."""

def decode_index(payload: bytes) -> int:
    """NBD_ATTR_INDEX of a CONNECT reply or LINK_DEAD notification."""

def decode_device_list(payload: bytes) -> list[tuple[int, bool]]:
    """A STATUS reply as ``[(index, connected), ...]``."""

def split_device_list(payload: bytes) -> tuple[list[int], list[int]]:
    """A STATUS reply as ``(configured, free)`` index lists."""

@disjoint_base
class NbdNetlink:
    """A generic netlink socket bound to the ``nbd`` family, resolved once at
    construction (NbdModuleNotLoaded when the module is absent). One thread at a time:
    concurrent use raises RuntimeError; give each thread its own :meth:`clone`."""

    family_id: int
    mcast_group_id: int
    def __init__(self, family_id: int | None = None, mcast_group_id: int | None = None) -> None:
        """Opens the socket; resolves the family (one round trip) unless ids are given."""
    def clone(self) -> NbdNetlink:
        """A new socket for the same family, without resolving it again."""
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def connect(
        self,
        socket_fds: Sequence[int],
        size_bytes: int,
        *,
        block_size: int = 4096,
        server_flags: int = 0,
        timeout_s: int = 0,
        dead_conn_timeout_s: int = 0,
        backend_id: str | None = None,
        index: int | None = None,
        client_flags: int = 0,
    ) -> int:
        """CONNECT; returns the device index. Blocks until the kernel started the device
        (capacity set, ``/sys/block/nbdX/pid`` present). Close your socket copies after.
        Errors: NbdPermissionError (EPERM), DeviceBusy (EBUSY for a busy explicit
        index), NetlinkError EINVAL (bad block size; several sockets without
        CAN_MULTI_CONN in ``server_flags``)."""
    def disconnect(self, index: int) -> None:
        """DISCONNECT; blocks until the kernel shut the sockets down. No ownership check
        in the kernel: verify ``/sys/block/nbdX/backend`` first."""
    def reconfigure(
        self,
        index: int,
        socket_fds: Sequence[int] = (),
        *,
        backend_id: str | None = None,
        timeout_s: int | None = None,
        dead_conn_timeout_s: int | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """RECONFIGURE: fresh sockets replace dead connections (ignored when none is
        dead); timeouts and the size change. A new size freezes the queue: no I/O may be
        in flight. NetlinkError EINVAL: not netlink-connected, or backend mismatch."""
    def status(self, index: int | None = None) -> list[tuple[int, bool]]:
        """STATUS of one device or all: ``[(index, configured)]``. No privilege needed.
        ``configured`` is true while anything holds the device (an udev open counts)."""
    def status_split(self) -> tuple[list[int], list[int]]:
        """STATUS of all devices as ``(configured, free)`` index lists."""
    def transact(self, message: bytes) -> list[bytes]:
        """Send raw request bytes; return every raw reply for their sequence number,
        the final ack or error included (kernel errors are returned, not raised)."""

@disjoint_base
class LinkDeadListener:
    """Subscribed to the nbd multicast group; reports devices whose connection died."""

    def __init__(self, family_id: int, mcast_group_id: int) -> None: ...
    def fileno(self) -> int:
        """Readable when notifications are pending (for select/poll)."""
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def receive(self, timeout_s: float | None = None) -> list[tuple[int, str | None]]:
        """Wait up to ``timeout_s`` (None: forever) with the GIL released; returns
        ``[(index, backend_id)]``, empty on timeout. Index -1: notifications were lost
        (ENOBUFS), re-check every device."""

@disjoint_base
class Negotiated:
    """Sockets that finished the handshake; owns the descriptors until :meth:`close`."""

    size_bytes: int
    transmission_flags: int
    handshake_flags: int
    min_block_size: int
    preferred_block_size: int
    max_block_size: int
    used_go: bool
    export_name: str
    @property
    def socket_fds(self) -> tuple[int, ...]: ...
    @property
    def can_multi_conn(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...

@disjoint_base
class Handshake:
    """An NBD handshake in two steps, so the caller can work while the server accepts.

    The constructor connects ``connections`` sockets (blocking, GIL released); given the
    server's handshake flags from an earlier connection (``assume_handshake_flags``,
    fixed-newstyle servers only) it also sends the client flags and NBD_OPT_GO at once,
    saving a round trip. ``timeout_s`` is one deadline for both steps, from the
    constructor on. Errors as for :func:`negotiate`; early flags that turn out wrong fail
    :meth:`finish` with HandshakeError(EAGAIN): negotiate again without."""

    def __init__(
        self,
        address: ServerAddress,
        export_name: str,
        connections: int = 1,
        timeout_s: float = 10.0,
        assume_handshake_flags: int = -1,
    ) -> None: ...
    def finish(self) -> Negotiated:
        """Complete the negotiation (blocking, GIL released); the result owns the
        sockets. ValueError when called twice."""
    def close(self) -> None:
        """Abandon the handshake and close its sockets (idempotent)."""

def negotiate(
    address: ServerAddress,
    export_name: str,
    connections: int = 1,
    timeout_s: float = 10.0,
    assume_handshake_flags: int = -1,
) -> Negotiated:
    """Open ``connections`` sockets to ``address`` (unix path, or ``(host, port)`` for
    TCP with TCP_NODELAY) and negotiate ``export_name`` on each, pipelined across the
    sockets: fixed newstyle, NO_ZEROES when offered, NBD_OPT_GO with INFO_EXPORT and
    INFO_BLOCK_SIZE, NBD_OPT_EXPORT_NAME only on ERR_UNSUP or a non-fixed server; never
    structured replies. Blocks (GIL released); ``timeout_s`` (0 < t <= 3600, else
    ValueError) bounds the whole handshake, however the server paces its bytes. Raises
    ExportNotFound or HandshakeError (see its errno list; ETIMEDOUT at the deadline,
    EPROTO for a reply longer than NBD_MAX_STRING allows, EAGAIN when
    ``assume_handshake_flags`` did not match the server)."""

def list_exports(address: ServerAddress, timeout_s: float = 10.0) -> list[tuple[str, str]]:
    """NBD_OPT_LIST for diagnostics: ``[(name, description)]``. Blocks (GIL released),
    bounded by ``timeout_s`` as :func:`negotiate` is."""

def greet(address: ServerAddress, timeout_s: float = 10.0) -> int:
    """Reads an NBD server's newstyle greeting and ends the session with NBD_OPT_ABORT;
    returns its handshake flags. Blocks (GIL released), bounded by ``timeout_s`` as
    :func:`negotiate` is; HandshakeError (an OSError) when no NBD server answers."""

def read_sysfs(index: int, name: str) -> str | None:
    """``/sys/block/nbd<index>/<name>`` without its newline; None when absent
    (``pid`` and ``backend`` exist only while connected)."""

def find_backend(indexes: Iterable[int], backend_id: str) -> int:
    """The first of ``indexes`` whose sysfs ``backend`` equals ``backend_id``, else -1
    (one call, sysfs read with the GIL released)."""

def block_device_size(path: str) -> int:
    """BLKGETSIZE64 of a block device node (opened read-only)."""

@disjoint_base
class UeventWatch:
    """Kernel uevents, opened before CONNECT so the change event cannot be missed."""

    @property
    def available(self) -> bool:
        """False where the uevent socket cannot be opened."""
    def close(self) -> None: ...

def lock_disk(index: int, timeout_s: float = 10.0, dev_dir: str = "/dev") -> int:
    """Open ``/dev/nbd<index>`` read-only holding LOCK_EX, waiting (GIL released, at most
    ``timeout_s``) while udev's probe holds its shared lock; returns the descriptor.
    Held across a DISCONNECT, udev's probe waits until the kernel has cleared the
    capacity. No I/O: a hung server does not block it. DeviceNotReady (ETIMEDOUT),
    NbdError."""

def wait_ready(
    index: int,
    size_bytes: int,
    timeout_s: float = 10.0,
    *,
    watch: UeventWatch | None = None,
    keep_lock: bool = False,
    dev_dir: str = "/dev",
) -> int | None:
    """Ensure ``/dev/nbd<index>`` is usable: node present (mknod from sysfs when missing),
    change uevent seen (with ``watch``), capacity equal to ``size_bytes`` rounded down to
    512, and LOCK_EX on the whole disk (waiting while udev's probe holds its shared
    lock: woken by close events, re-checked on a 10-250 ms backoff). Returns the locked
    read-only descriptor when ``keep_lock`` (udev postpones its probe until it is
    closed), else None. Blocks (GIL released) at most
    ``timeout_s``: DeviceNotReady (ETIMEDOUT; EIO for a size mismatch), NbdError."""

@disjoint_base
class IoctlDevice:
    """One /dev/nbdX through the legacy ioctls (kernels without nbd netlink)."""

    index: int
    path: str
    def __init__(self, index: int, dev_dir: str = "/dev") -> None:
        """Opens the node read-write (mknod from sysfs when missing)."""
    def configure(
        self,
        socket_fds: Sequence[int],
        size_bytes: int,
        *,
        block_size: int = 4096,
        flags: int = 0,
        timeout_s: int = 0,
    ) -> None:
        """NBD_SET_SOCK per socket (DeviceBusy when another task set it up), then
        SET_BLKSIZE, SET_SIZE_BLOCKS, SET_TIMEOUT, SET_FLAGS."""
    def run(self) -> None:
        """NBD_DO_IT: blocks (GIL released) for the life of the connection; call it on
        a dedicated thread. Returns normally after a requested disconnect."""
    def disconnect(self) -> None:
        """NBD_DISCONNECT."""
    def clear_sock(self) -> None:
        """NBD_CLEAR_SOCK."""
    def close(self) -> None: ...
