# cython: language_level=3
"""Kernel-facing attach path: NBD generic netlink, the NBD client handshake, the ioctl
fallback, device facts from sysfs and readiness after connect.

Every blocking system call runs with the GIL released; errors are raised after the GIL
is taken back. No module-level state holds a session: each object owns its sockets.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc

from zerofs_csi.nbd cimport _nbd_linux as c

import errno as _errno
import os as _os

# ---------------------------------------------------------------------------------------
# Constants. Explicit numbers; each one is compared with the header it cites at build
# time (see _HEADER_CHECKS below), so a disagreement fails the compile.
# ---------------------------------------------------------------------------------------

cdef enum:
    # include/uapi/linux/netlink.h
    NL_F_REQUEST = 0x1
    NL_F_MULTI = 0x2
    NL_F_ACK = 0x4
    NL_F_CAPPED = 0x100
    NL_F_ACK_TLVS = 0x200
    NL_MSG_NOOP = 1
    NL_MSG_ERROR = 2
    NL_MSG_DONE = 3
    NL_MSG_OVERRUN = 4
    NL_PROTO_KOBJECT_UEVENT = 15
    NL_PROTO_GENERIC = 16
    NL_OPT_ADD_MEMBERSHIP = 1
    NL_OPT_CAP_ACK = 10
    NL_OPT_EXT_ACK = 11
    NL_ERR_ATTR_MSG = 1
    NL_ERR_ATTR_OFFS = 2
    NLA_NESTED_FLAG = 0x8000
    NLA_TYPE_BITS = 0x3FFF
    # bits/socket.h (glibc), from include/linux/socket.h
    SOL_NETLINK_LEVEL = 270
    # include/uapi/linux/genetlink.h
    GENL_CTRL_ID = 16
    GENL_CTRL_CMD_NEWFAMILY = 1
    GENL_CTRL_CMD_GETFAMILY = 3
    GENL_CTRL_ATTR_FAMILY_ID = 1
    GENL_CTRL_ATTR_FAMILY_NAME = 2
    GENL_CTRL_ATTR_MCAST_GROUPS = 7
    GENL_CTRL_ATTR_MCAST_GRP_NAME = 1
    GENL_CTRL_ATTR_MCAST_GRP_ID = 2
    # include/uapi/linux/nbd-netlink.h
    NBD_GENL_VERSION_1 = 1
    ATTR_INDEX = 1
    ATTR_SIZE_BYTES = 2
    ATTR_BLOCK_SIZE_BYTES = 3
    ATTR_TIMEOUT = 4
    ATTR_SERVER_FLAGS = 5
    ATTR_CLIENT_FLAGS = 6
    ATTR_SOCKETS = 7
    ATTR_DEAD_CONN_TIMEOUT = 8
    ATTR_DEVICE_LIST = 9
    ATTR_BACKEND_IDENTIFIER = 10
    SOCK_ITEM = 1
    SOCK_FD = 1
    DEVICE_ITEM = 1
    DEVICE_INDEX = 1
    DEVICE_CONNECTED = 2
    CMD_CONNECT = 1
    CMD_DISCONNECT = 2
    CMD_RECONFIGURE = 3
    CMD_LINK_DEAD = 4
    CMD_STATUS = 5
    # include/uapi/linux/nbd.h: client flags and transmission flags
    CFLAG_DESTROY_ON_DISCONNECT = 1
    CFLAG_DISCONNECT_ON_CLOSE = 2
    TFLAG_HAS_FLAGS = 1 << 0
    TFLAG_READ_ONLY = 1 << 1
    TFLAG_SEND_FLUSH = 1 << 2
    TFLAG_SEND_FUA = 1 << 3
    TFLAG_ROTATIONAL = 1 << 4
    TFLAG_SEND_TRIM = 1 << 5
    TFLAG_SEND_WRITE_ZEROES = 1 << 6
    TFLAG_CAN_MULTI_CONN = 1 << 8
    # NBD protocol (doc/proto.md of NetworkBlockDevice/nbd): handshake
    HS_FLAG_FIXED_NEWSTYLE = 1 << 0
    HS_FLAG_NO_ZEROES = 1 << 1
    OPT_EXPORT_NAME = 1
    OPT_ABORT = 2
    OPT_LIST = 3
    OPT_STARTTLS = 5
    OPT_INFO = 6
    OPT_GO = 7
    OPT_STRUCTURED_REPLY = 8
    INFO_EXPORT = 0
    INFO_NAME = 1
    INFO_DESCRIPTION = 2
    INFO_BLOCK_SIZE = 3
    REP_ACK = 1
    REP_SERVER = 2
    REP_INFO = 3
    # Limits of this module, not of the kernel.
    MAX_CONNECTIONS = 16
    SEND_CAPACITY = 4096
    SEND_WORDS = 1024
    RECV_CAPACITY = 65536
    HS_BUFFER = 4096
    # nbd's own bound on a string in the handshake (NBD_MAX_STRING, nbd's cliserv.h):
    # export names, descriptions, error messages. A reply carries at most one (INFO) or
    # two (an export list entry), so every reply length is bounded by it.
    NBD_MAX_STRING = 4096
    HS_MAX_INFO = 2 + NBD_MAX_STRING
    HS_MAX_LIST_ENTRY = 4 + 2 * NBD_MAX_STRING

# include/uapi/linux/nbd.h: ioctl numbers, _IO(0xab, n); include/uapi/linux/fs.h: BLKGETSIZE64
cdef unsigned long IOCTL_SET_SOCK = 0xAB00
cdef unsigned long IOCTL_SET_BLKSIZE = 0xAB01
cdef unsigned long IOCTL_DO_IT = 0xAB03
cdef unsigned long IOCTL_CLEAR_SOCK = 0xAB04
cdef unsigned long IOCTL_SET_SIZE_BLOCKS = 0xAB07
cdef unsigned long IOCTL_DISCONNECT = 0xAB08
cdef unsigned long IOCTL_SET_TIMEOUT = 0xAB09
cdef unsigned long IOCTL_SET_FLAGS = 0xAB0A
cdef unsigned long IOCTL_BLKGETSIZE64 = 0x80081272

# NBD protocol magic numbers (doc/proto.md).
cdef uint64_t NBDMAGIC = 0x4E42444D41474943
cdef uint64_t IHAVEOPT = 0x49484156454F5054
cdef uint64_t OLDSTYLE_MAGIC = 0x00420281861253
cdef uint64_t OPTION_REPLY_MAGIC = 0x3E889045565A9
cdef uint32_t REP_ERROR_BIT = 0x80000000
cdef uint32_t REP_ERR_UNSUP = 0x80000001
cdef uint32_t REP_ERR_POLICY = 0x80000002
cdef uint32_t REP_ERR_INVALID = 0x80000003
cdef uint32_t REP_ERR_PLATFORM = 0x80000004
cdef uint32_t REP_ERR_TLS_REQD = 0x80000005
cdef uint32_t REP_ERR_UNKNOWN = 0x80000006
cdef uint32_t REP_ERR_SHUTDOWN = 0x80000007
cdef uint32_t REP_ERR_BLOCK_SIZE_REQD = 0x80000008
cdef uint32_t REP_ERR_TOO_BIG = 0x80000009

cdef long _HEADER_CHECKS = (
    c.SAME_AS_HEADER(NL_F_REQUEST, c.NLM_F_REQUEST)
    + c.SAME_AS_HEADER(NL_F_MULTI, c.NLM_F_MULTI)
    + c.SAME_AS_HEADER(NL_F_ACK, c.NLM_F_ACK)
    + c.SAME_AS_HEADER(NL_F_CAPPED, c.NLM_F_CAPPED)
    + c.SAME_AS_HEADER(NL_F_ACK_TLVS, c.NLM_F_ACK_TLVS)
    + c.SAME_AS_HEADER(NL_MSG_NOOP, c.NLMSG_NOOP)
    + c.SAME_AS_HEADER(NL_MSG_ERROR, c.NLMSG_ERROR)
    + c.SAME_AS_HEADER(NL_MSG_DONE, c.NLMSG_DONE)
    + c.SAME_AS_HEADER(NL_MSG_OVERRUN, c.NLMSG_OVERRUN)
    + c.SAME_AS_HEADER(NL_PROTO_KOBJECT_UEVENT, c.NETLINK_KOBJECT_UEVENT)
    + c.SAME_AS_HEADER(NL_PROTO_GENERIC, c.NETLINK_GENERIC)
    + c.SAME_AS_HEADER(NL_OPT_ADD_MEMBERSHIP, c.NETLINK_ADD_MEMBERSHIP)
    + c.SAME_AS_HEADER(NL_OPT_CAP_ACK, c.NETLINK_CAP_ACK)
    + c.SAME_AS_HEADER(NL_OPT_EXT_ACK, c.NETLINK_EXT_ACK)
    + c.SAME_AS_HEADER(NL_ERR_ATTR_MSG, c.NLMSGERR_ATTR_MSG)
    + c.SAME_AS_HEADER(NL_ERR_ATTR_OFFS, c.NLMSGERR_ATTR_OFFS)
    + c.SAME_AS_HEADER(NLA_NESTED_FLAG, c.NLA_F_NESTED)
    + c.SAME_AS_HEADER(NLA_TYPE_BITS, <uint16_t>c.NLA_TYPE_MASK)
    + c.SAME_AS_HEADER(SOL_NETLINK_LEVEL, c.SOL_NETLINK)
    + c.SAME_AS_HEADER(GENL_CTRL_ID, c.GENL_ID_CTRL)
    + c.SAME_AS_HEADER(GENL_CTRL_CMD_NEWFAMILY, c.CTRL_CMD_NEWFAMILY)
    + c.SAME_AS_HEADER(GENL_CTRL_CMD_GETFAMILY, c.CTRL_CMD_GETFAMILY)
    + c.SAME_AS_HEADER(GENL_CTRL_ATTR_FAMILY_ID, c.CTRL_ATTR_FAMILY_ID)
    + c.SAME_AS_HEADER(GENL_CTRL_ATTR_FAMILY_NAME, c.CTRL_ATTR_FAMILY_NAME)
    + c.SAME_AS_HEADER(GENL_CTRL_ATTR_MCAST_GROUPS, c.CTRL_ATTR_MCAST_GROUPS)
    + c.SAME_AS_HEADER(GENL_CTRL_ATTR_MCAST_GRP_NAME, c.CTRL_ATTR_MCAST_GRP_NAME)
    + c.SAME_AS_HEADER(GENL_CTRL_ATTR_MCAST_GRP_ID, c.CTRL_ATTR_MCAST_GRP_ID)
    + c.SAME_AS_HEADER(NBD_GENL_VERSION_1, c.NBD_GENL_VERSION)
    + c.SAME_AS_HEADER(ATTR_INDEX, c.NBD_ATTR_INDEX)
    + c.SAME_AS_HEADER(ATTR_SIZE_BYTES, c.NBD_ATTR_SIZE_BYTES)
    + c.SAME_AS_HEADER(ATTR_BLOCK_SIZE_BYTES, c.NBD_ATTR_BLOCK_SIZE_BYTES)
    + c.SAME_AS_HEADER(ATTR_TIMEOUT, c.NBD_ATTR_TIMEOUT)
    + c.SAME_AS_HEADER(ATTR_SERVER_FLAGS, c.NBD_ATTR_SERVER_FLAGS)
    + c.SAME_AS_HEADER(ATTR_CLIENT_FLAGS, c.NBD_ATTR_CLIENT_FLAGS)
    + c.SAME_AS_HEADER(ATTR_SOCKETS, c.NBD_ATTR_SOCKETS)
    + c.SAME_AS_HEADER(ATTR_DEAD_CONN_TIMEOUT, c.NBD_ATTR_DEAD_CONN_TIMEOUT)
    + c.SAME_AS_HEADER(ATTR_DEVICE_LIST, c.NBD_ATTR_DEVICE_LIST)
    + c.SAME_AS_HEADER(ATTR_BACKEND_IDENTIFIER, c.NBD_ATTR_BACKEND_IDENTIFIER)
    + c.SAME_AS_HEADER(SOCK_ITEM, c.NBD_SOCK_ITEM)
    + c.SAME_AS_HEADER(SOCK_FD, c.NBD_SOCK_FD)
    + c.SAME_AS_HEADER(DEVICE_ITEM, c.NBD_DEVICE_ITEM)
    + c.SAME_AS_HEADER(DEVICE_INDEX, c.NBD_DEVICE_INDEX)
    + c.SAME_AS_HEADER(DEVICE_CONNECTED, c.NBD_DEVICE_CONNECTED)
    + c.SAME_AS_HEADER(CMD_CONNECT, c.NBD_CMD_CONNECT)
    + c.SAME_AS_HEADER(CMD_DISCONNECT, c.NBD_CMD_DISCONNECT)
    + c.SAME_AS_HEADER(CMD_RECONFIGURE, c.NBD_CMD_RECONFIGURE)
    + c.SAME_AS_HEADER(CMD_LINK_DEAD, c.NBD_CMD_LINK_DEAD)
    + c.SAME_AS_HEADER(CMD_STATUS, c.NBD_CMD_STATUS)
    + c.SAME_AS_HEADER(CFLAG_DESTROY_ON_DISCONNECT, c.NBD_CFLAG_DESTROY_ON_DISCONNECT)
    + c.SAME_AS_HEADER(CFLAG_DISCONNECT_ON_CLOSE, c.NBD_CFLAG_DISCONNECT_ON_CLOSE)
    + c.SAME_AS_HEADER(TFLAG_HAS_FLAGS, c.NBD_FLAG_HAS_FLAGS)
    + c.SAME_AS_HEADER(TFLAG_READ_ONLY, c.NBD_FLAG_READ_ONLY)
    + c.SAME_AS_HEADER(TFLAG_SEND_FLUSH, c.NBD_FLAG_SEND_FLUSH)
    + c.SAME_AS_HEADER(TFLAG_SEND_FUA, c.NBD_FLAG_SEND_FUA)
    + c.SAME_AS_HEADER(TFLAG_SEND_TRIM, c.NBD_FLAG_SEND_TRIM)
    + c.SAME_AS_HEADER(TFLAG_CAN_MULTI_CONN, c.NBD_FLAG_CAN_MULTI_CONN)
    + c.SAME_AS_HEADER(IOCTL_SET_SOCK, c.NBD_SET_SOCK)
    + c.SAME_AS_HEADER(IOCTL_SET_BLKSIZE, c.NBD_SET_BLKSIZE)
    + c.SAME_AS_HEADER(IOCTL_DO_IT, c.NBD_DO_IT)
    + c.SAME_AS_HEADER(IOCTL_CLEAR_SOCK, c.NBD_CLEAR_SOCK)
    + c.SAME_AS_HEADER(IOCTL_SET_SIZE_BLOCKS, c.NBD_SET_SIZE_BLOCKS)
    + c.SAME_AS_HEADER(IOCTL_DISCONNECT, c.NBD_DISCONNECT)
    + c.SAME_AS_HEADER(IOCTL_SET_TIMEOUT, c.NBD_SET_TIMEOUT)
    + c.SAME_AS_HEADER(IOCTL_SET_FLAGS, c.NBD_SET_FLAGS)
    + c.SAME_AS_HEADER(IOCTL_BLKGETSIZE64, c.BLKGETSIZE64)
)

# Python-visible names for the numbers callers need.
NBD_CMD_CONNECT = CMD_CONNECT
NBD_CMD_DISCONNECT = CMD_DISCONNECT
NBD_CMD_RECONFIGURE = CMD_RECONFIGURE
NBD_CMD_LINK_DEAD = CMD_LINK_DEAD
NBD_CMD_STATUS = CMD_STATUS
NBD_CFLAG_DESTROY_ON_DISCONNECT = CFLAG_DESTROY_ON_DISCONNECT
NBD_CFLAG_DISCONNECT_ON_CLOSE = CFLAG_DISCONNECT_ON_CLOSE
NBD_FLAG_HAS_FLAGS = TFLAG_HAS_FLAGS
NBD_FLAG_READ_ONLY = TFLAG_READ_ONLY
NBD_FLAG_SEND_FLUSH = TFLAG_SEND_FLUSH
NBD_FLAG_SEND_FUA = TFLAG_SEND_FUA
NBD_FLAG_ROTATIONAL = TFLAG_ROTATIONAL
NBD_FLAG_SEND_TRIM = TFLAG_SEND_TRIM
NBD_FLAG_SEND_WRITE_ZEROES = TFLAG_SEND_WRITE_ZEROES
NBD_FLAG_CAN_MULTI_CONN = TFLAG_CAN_MULTI_CONN
MAX_SOCKETS = MAX_CONNECTIONS
NBD_MAJOR = 43  # include/uapi/linux/major.h

# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class NbdError(OSError):
    """Base of every error raised by this module."""


class NbdModuleNotLoaded(NbdError):
    """The kernel has no ``nbd`` generic netlink family (errno ENOENT)."""


class NbdFamilyOutsideNamespace(NbdModuleNotLoaded):
    """The nbd module is loaded, but its generic netlink family exists in the host's
    initial network namespace only and this process runs in another one (errno ENOENT)."""


class NbdPermissionError(NbdError):
    """The caller lacks CAP_SYS_ADMIN (errno EPERM)."""


class DeviceBusy(NbdError):
    """The device is in use by someone else (errno EBUSY)."""


class NotOwner(NbdError):
    """The device serves another backend; refusing to touch it (errno EPERM)."""


class DeviceNotReady(NbdError):
    """The device did not become ready in time (errno ETIMEDOUT or EIO)."""


class NetlinkError(NbdError):
    """The kernel answered a netlink request with an error; ``kernel_message`` holds the
    extended-ack text when the kernel sent one."""

    kernel_message = None


class HandshakeError(NbdError):
    """The NBD server refused or broke the handshake."""


class ExportNotFound(HandshakeError):
    """The server does not know the export name (errno ENOENT)."""


cdef object _netlink_error(int err, str operation, object kernel_message):
    text = f"nbd netlink {operation} failed: {_os.strerror(err)}"
    if kernel_message:
        text += f" (kernel: {kernel_message})"
    if err == c.EPERM or err == c.EACCES:
        cls = NbdPermissionError
        text += "; CONNECT, DISCONNECT and RECONFIGURE need CAP_SYS_ADMIN"
    elif err == c.EBUSY:
        cls = DeviceBusy
        text += "; the device is in use (udev may be probing it): omit the index or retry"
    else:
        cls = NetlinkError
    exc = cls(err, text)
    exc.kernel_message = kernel_message
    return exc


cdef object _os_error(int err, str what, object path=None):
    text = f"{what}: {_os.strerror(err)}"
    if err == c.EPERM or err == c.EACCES:
        return NbdPermissionError(err, text + " (needs CAP_SYS_ADMIN)", path)
    if err == c.EBUSY:
        return DeviceBusy(err, text, path)
    return NbdError(err, text, path)


# ---------------------------------------------------------------------------------------
# Small C helpers
# ---------------------------------------------------------------------------------------

cdef inline double _now() noexcept nogil:
    cdef c.timespec ts
    c.clock_gettime(c.CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline int _remaining_ms(double deadline) noexcept nogil:
    cdef double left = deadline - _now()
    if left <= 0:
        return 0
    return <int>(left * 1000.0) + 1


cdef inline size_t _align4(size_t n) noexcept nogil:
    return (n + 3) & ~(<size_t>3)


cdef int _read_small_file(const char *path, char *out, size_t cap) noexcept nogil:
    """Read a sysfs attribute into ``out`` (NUL-terminated, trailing newline cut).
    Returns its length or -errno."""
    cdef int fd = c.open(path, c.O_RDONLY | c.O_CLOEXEC)
    cdef c.ssize_t n
    if fd < 0:
        return -c.errno
    n = c.read(fd, out, cap - 1)
    if n < 0:
        n = -c.errno
        c.close(fd)
        return <int>n
    c.close(fd)
    while n > 0 and (out[n - 1] == b'\n' or out[n - 1] == b'\0'):
        n -= 1
    out[n] = 0
    return <int>n


# ---------------------------------------------------------------------------------------
# Netlink message building (pure: the same code builds golden-test bytes and requests)
# ---------------------------------------------------------------------------------------

cdef struct MsgBuf:
    unsigned char *data
    size_t cap
    size_t length
    bint overflow


cdef struct NbdParams:
    int cmd
    bint has_index
    uint32_t index
    bint has_size
    uint64_t size_bytes
    bint has_block_size
    uint64_t block_size
    bint has_timeout
    uint64_t timeout_s
    bint has_dead_conn_timeout
    uint64_t dead_conn_timeout_s
    bint has_server_flags
    uint64_t server_flags
    bint has_client_flags
    uint64_t client_flags
    int nfds
    uint32_t fds[MAX_CONNECTIONS]
    const char *backend
    size_t backend_len


cdef size_t _attr_put(MsgBuf *m, uint16_t typ, const void *payload, size_t n) noexcept nogil:
    cdef size_t start = m.length
    cdef size_t total = _align4(4 + n)
    cdef c.nlattr hdr
    if m.overflow or start + total > m.cap:
        m.overflow = True
        return start
    hdr.nla_len = <uint16_t>(4 + n)
    hdr.nla_type = typ
    c.memcpy(m.data + start, &hdr, 4)
    if n:
        c.memcpy(m.data + start + 4, payload, n)
    c.memset(m.data + start + 4 + n, 0, total - 4 - n)
    m.length = start + total
    return start


cdef inline void _attr_u32(MsgBuf *m, uint16_t typ, uint32_t v) noexcept nogil:
    _attr_put(m, typ, &v, 4)


cdef inline void _attr_u64(MsgBuf *m, uint16_t typ, uint64_t v) noexcept nogil:
    _attr_put(m, typ, &v, 8)


cdef inline size_t _nest_begin(MsgBuf *m, uint16_t typ) noexcept nogil:
    return _attr_put(m, typ | NLA_NESTED_FLAG, NULL, 0)


cdef inline void _nest_end(MsgBuf *m, size_t start) noexcept nogil:
    cdef uint16_t n
    if m.overflow:
        return
    n = <uint16_t>(m.length - start)
    c.memcpy(m.data + start, &n, 2)


cdef void _msg_begin(MsgBuf *m, uint16_t nl_type, uint16_t flags, uint32_t seq,
                     uint8_t cmd, uint8_t version) noexcept nogil:
    cdef c.nlmsghdr hdr
    cdef c.genlmsghdr genl
    m.length = 0
    m.overflow = m.cap < 20
    if m.overflow:
        return
    hdr.nlmsg_len = 20
    hdr.nlmsg_type = nl_type
    hdr.nlmsg_flags = flags
    hdr.nlmsg_seq = seq
    hdr.nlmsg_pid = 0
    genl.cmd = cmd
    genl.version = version
    genl.reserved = 0
    c.memcpy(m.data, &hdr, 16)
    c.memcpy(m.data + 16, &genl, 4)
    m.length = 20


cdef inline void _msg_end(MsgBuf *m) noexcept nogil:
    cdef uint32_t n = <uint32_t>m.length
    if not m.overflow:
        c.memcpy(m.data, &n, 4)


cdef void _build_getfamily(MsgBuf *m, uint32_t seq, const char *name, size_t name_len) noexcept nogil:
    _msg_begin(m, GENL_CTRL_ID, NL_F_REQUEST | NL_F_ACK, seq, GENL_CTRL_CMD_GETFAMILY, 1)
    # The name attribute carries its NUL terminator, as the controller's policy expects.
    cdef size_t start = m.length
    cdef size_t total = _align4(4 + name_len + 1)
    cdef c.nlattr hdr
    if m.overflow or start + total > m.cap:
        m.overflow = True
        return
    hdr.nla_len = <uint16_t>(4 + name_len + 1)
    hdr.nla_type = GENL_CTRL_ATTR_FAMILY_NAME
    c.memcpy(m.data + start, &hdr, 4)
    c.memcpy(m.data + start + 4, name, name_len)
    c.memset(m.data + start + 4 + name_len, 0, total - 4 - name_len)
    m.length = start + total
    _msg_end(m)


cdef void _build_nbd(MsgBuf *m, uint16_t family, uint32_t seq, const NbdParams *p) noexcept nogil:
    cdef size_t nest, item
    cdef int i
    cdef size_t start, total
    cdef c.nlattr hdr
    _msg_begin(m, family, NL_F_REQUEST | NL_F_ACK, seq, <uint8_t>p.cmd, NBD_GENL_VERSION_1)
    if p.has_index:
        _attr_u32(m, ATTR_INDEX, p.index)
    if p.has_size:
        _attr_u64(m, ATTR_SIZE_BYTES, p.size_bytes)
    if p.has_block_size:
        _attr_u64(m, ATTR_BLOCK_SIZE_BYTES, p.block_size)
    if p.has_timeout:
        _attr_u64(m, ATTR_TIMEOUT, p.timeout_s)
    if p.has_dead_conn_timeout:
        _attr_u64(m, ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout_s)
    if p.has_server_flags:
        _attr_u64(m, ATTR_SERVER_FLAGS, p.server_flags)
    if p.has_client_flags:
        _attr_u64(m, ATTR_CLIENT_FLAGS, p.client_flags)
    if p.backend != NULL:
        # NUL-terminated string, as the kernel's nla_strdup/nla_strcmp expect.
        start = m.length
        total = _align4(4 + p.backend_len + 1)
        if m.overflow or start + total > m.cap:
            m.overflow = True
        else:
            hdr.nla_len = <uint16_t>(4 + p.backend_len + 1)
            hdr.nla_type = ATTR_BACKEND_IDENTIFIER
            c.memcpy(m.data + start, &hdr, 4)
            c.memcpy(m.data + start + 4, p.backend, p.backend_len)
            c.memset(m.data + start + 4 + p.backend_len, 0, total - 4 - p.backend_len)
            m.length = start + total
    if p.nfds > 0:
        nest = _nest_begin(m, ATTR_SOCKETS)
        for i in range(p.nfds):
            item = _nest_begin(m, SOCK_ITEM)
            _attr_u32(m, SOCK_FD, p.fds[i])
            _nest_end(m, item)
        _nest_end(m, nest)
    _msg_end(m)


cdef int _fill_params(NbdParams *p, int cmd, object index, object size_bytes,
                      object block_size, object timeout_s, object dead_conn_timeout_s,
                      object server_flags, object client_flags, object socket_fds,
                      bytes backend) except -1:
    c.memset(p, 0, sizeof(NbdParams))
    p.cmd = cmd
    if index is not None:
        if not 0 <= index < 0xFFFFFFFF:
            raise ValueError(f"device index out of range: {index}")
        p.has_index = True
        p.index = index
    if size_bytes is not None:
        p.has_size = True
        p.size_bytes = size_bytes
    if block_size is not None:
        p.has_block_size = True
        p.block_size = block_size
    if timeout_s is not None:
        p.has_timeout = True
        p.timeout_s = timeout_s
    if dead_conn_timeout_s is not None:
        p.has_dead_conn_timeout = True
        p.dead_conn_timeout_s = dead_conn_timeout_s
    if server_flags is not None:
        p.has_server_flags = True
        p.server_flags = server_flags
    if client_flags is not None:
        p.has_client_flags = True
        p.client_flags = client_flags
    fds = list(socket_fds)
    if len(fds) > MAX_CONNECTIONS:
        raise ValueError(f"at most {MAX_CONNECTIONS} sockets per device, got {len(fds)}")
    for fd in fds:
        if fd < 0:
            raise ValueError(f"bad socket descriptor {fd}")
        p.fds[p.nfds] = fd
        p.nfds += 1
    if backend is not None:
        if b"\0" in backend:
            raise ValueError("backend identifier must not contain NUL")
        p.backend = PyBytes_AS_STRING(backend)
        p.backend_len = len(backend)
    return 0


def build_getfamily_message(uint32_t seq, family_name="nbd"):
    """Bytes of a CTRL_CMD_GETFAMILY request for ``family_name`` (NLM_F_REQUEST|NLM_F_ACK)."""
    cdef bytes name = family_name.encode()
    cdef uint32_t storage[64]
    cdef MsgBuf m
    m.data = <unsigned char *>storage
    m.cap = sizeof(storage)
    _build_getfamily(&m, seq, name, len(name))
    if m.overflow:
        raise ValueError("family name too long")
    return PyBytes_FromStringAndSize(<char *>m.data, m.length)


def build_nbd_message(int family_id, uint32_t seq, int cmd, *, index=None, size_bytes=None,
                      block_size=None, timeout_s=None, dead_conn_timeout_s=None,
                      server_flags=None, client_flags=None, socket_fds=(), backend_id=None):
    """Bytes of an nbd generic netlink request, exactly as this module sends it."""
    cdef NbdParams p
    cdef uint32_t storage[SEND_WORDS]
    cdef MsgBuf m
    backend = None if backend_id is None else backend_id.encode()
    _fill_params(&p, cmd, index, size_bytes, block_size, timeout_s, dead_conn_timeout_s,
                 server_flags, client_flags, socket_fds, backend)
    m.data = <unsigned char *>storage
    m.cap = sizeof(storage)
    _build_nbd(&m, <uint16_t>family_id, seq, &p)
    if m.overflow:
        raise ValueError("netlink message too long")
    return PyBytes_FromStringAndSize(<char *>m.data, m.length)


# ---------------------------------------------------------------------------------------
# Netlink message parsing (pure functions; used on live replies and on captured bytes)
# ---------------------------------------------------------------------------------------

cdef int _find_attr(const unsigned char *p, size_t n, uint16_t typ,
                    const unsigned char **out, size_t *out_len) noexcept nogil:
    """Find attribute ``typ`` in an attribute stream; 1 found, 0 absent, -1 malformed."""
    cdef size_t pos = 0
    cdef uint16_t alen, atype
    while pos + 4 <= n:
        c.memcpy(&alen, p + pos, 2)
        c.memcpy(&atype, p + pos + 2, 2)
        if alen < 4 or pos + alen > n:
            return -1
        if (atype & NLA_TYPE_BITS) == typ:
            out[0] = p + pos + 4
            out_len[0] = alen - 4
            return 1
        pos += _align4(alen)
    return 0


cdef object _attr_string(const unsigned char *p, size_t n):
    while n > 0 and p[n - 1] == 0:
        n -= 1
    return (<const char *>p)[:n].decode("utf-8", "replace")


cdef uint32_t _attr_uint(const unsigned char *p, size_t n) noexcept nogil:
    cdef uint32_t v32 = 0
    cdef uint16_t v16 = 0
    cdef uint8_t v8 = 0
    if n >= 4:
        c.memcpy(&v32, p, 4)
        return v32
    if n >= 2:
        c.memcpy(&v16, p, 2)
        return v16
    if n >= 1:
        v8 = p[0]
        return v8
    return 0


def decode_messages(data):
    """Split netlink bytes into ``(type, flags, seq, payload)`` tuples."""
    cdef const unsigned char[:] view = data
    cdef size_t n = view.shape[0]
    cdef size_t pos = 0
    cdef c.nlmsghdr hdr
    out = []
    if n == 0:
        return out
    while pos + 16 <= n:
        c.memcpy(&hdr, &view[pos], 16)
        if hdr.nlmsg_len < 16 or pos + hdr.nlmsg_len > n:
            raise ValueError(f"truncated netlink message at offset {pos}")
        out.append((hdr.nlmsg_type, hdr.nlmsg_flags, hdr.nlmsg_seq,
                    bytes(data[pos + 16:pos + hdr.nlmsg_len])))
        pos += _align4(hdr.nlmsg_len)
    return out


def decode_error(payload, int flags=0):
    """Decode an NLMSG_ERROR payload into ``(errno, kernel_message_or_None)``.
    errno 0 is a plain acknowledgement."""
    cdef const unsigned char[:] view = payload
    cdef size_t n = view.shape[0]
    cdef int32_t err
    cdef c.nlmsghdr inner
    cdef size_t skip
    cdef const unsigned char *a
    cdef size_t alen
    if n < 4:
        raise ValueError("short NLMSG_ERROR payload")
    c.memcpy(&err, &view[0], 4)
    message = None
    if flags & NL_F_ACK_TLVS and n >= 20:
        c.memcpy(&inner, &view[4], 16)
        # With NETLINK_CAP_ACK (or an ACK) only the request header is echoed.
        if err == 0 or flags & NL_F_CAPPED:
            skip = 4 + 16
        else:
            skip = 4 + _align4(inner.nlmsg_len)
        if skip < n and _find_attr(&view[skip], n - skip, NL_ERR_ATTR_MSG, &a, &alen) == 1:
            message = _attr_string(a, alen)
    return -err, message


def decode_genl_command(payload):
    """The generic netlink command byte of a message payload."""
    if len(payload) < 4:
        raise ValueError("short generic netlink payload")
    return payload[0]


def decode_family(payload):
    """Decode a CTRL_CMD_NEWFAMILY payload into ``(family_id, {group_name: group_id})``."""
    cdef const unsigned char[:] view = payload
    cdef size_t n = view.shape[0]
    cdef const unsigned char *a
    cdef const unsigned char *g
    cdef const unsigned char *v
    cdef size_t alen, glen, vlen, pos
    cdef uint16_t entry_len
    if n < 4:
        raise ValueError("short family payload")
    if _find_attr(&view[4], n - 4, GENL_CTRL_ATTR_FAMILY_ID, &a, &alen) != 1 or alen < 2:
        raise ValueError("family reply without CTRL_ATTR_FAMILY_ID")
    family_id = _attr_uint(a, 2)
    groups = {}
    if _find_attr(&view[4], n - 4, GENL_CTRL_ATTR_MCAST_GROUPS, &a, &alen) == 1:
        pos = 0
        while pos + 4 <= alen:
            c.memcpy(&entry_len, a + pos, 2)
            if entry_len < 4 or pos + entry_len > alen:
                raise ValueError("malformed multicast group list")
            g = a + pos + 4
            glen = entry_len - 4
            if (_find_attr(g, glen, GENL_CTRL_ATTR_MCAST_GRP_NAME, &v, &vlen) == 1):
                name = _attr_string(v, vlen)
                if _find_attr(g, glen, GENL_CTRL_ATTR_MCAST_GRP_ID, &v, &vlen) == 1:
                    groups[name] = _attr_uint(v, vlen)
            pos += _align4(entry_len)
    return family_id, groups


def decode_index(payload):
    """NBD_ATTR_INDEX of a CONNECT reply or a LINK_DEAD notification."""
    cdef const unsigned char[:] view = payload
    cdef size_t n = view.shape[0]
    cdef const unsigned char *a
    cdef size_t alen
    if n < 4 or _find_attr(&view[4], n - 4, ATTR_INDEX, &a, &alen) != 1 or alen < 4:
        raise ValueError("nbd message without NBD_ATTR_INDEX")
    return _attr_uint(a, 4)


def decode_device_list(payload):
    """Decode a STATUS reply into ``[(index, connected), ...]``."""
    cdef const unsigned char[:] view = payload
    cdef size_t n = view.shape[0]
    cdef const unsigned char *a
    cdef const unsigned char *item
    cdef const unsigned char *v
    cdef size_t alen, ilen, vlen, pos
    cdef uint16_t entry_len
    out = []
    if n < 4:
        raise ValueError("short status payload")
    if _find_attr(&view[4], n - 4, ATTR_DEVICE_LIST, &a, &alen) != 1:
        return out
    pos = 0
    while pos + 4 <= alen:
        c.memcpy(&entry_len, a + pos, 2)
        if entry_len < 4 or pos + entry_len > alen:
            raise ValueError("malformed device list")
        item = a + pos + 4
        ilen = entry_len - 4
        if _find_attr(item, ilen, DEVICE_INDEX, &v, &vlen) == 1 and vlen >= 4:
            index = _attr_uint(v, 4)
            connected = False
            if _find_attr(item, ilen, DEVICE_CONNECTED, &v, &vlen) == 1 and vlen >= 1:
                connected = v[0] != 0
            out.append((index, connected))
        pos += _align4(entry_len)
    return out


def split_device_list(bytes payload):
    """A STATUS reply as ``(configured, free)`` index lists."""
    cdef const unsigned char *base = <const unsigned char *>PyBytes_AS_STRING(payload)
    cdef size_t n = len(payload)
    cdef const unsigned char *a
    cdef const unsigned char *item
    cdef const unsigned char *v
    cdef size_t alen, ilen, vlen, pos = 0
    cdef uint16_t entry_len
    cdef bint connected
    configured = []
    free_ = []
    if n < 4 or _find_attr(base + 4, n - 4, ATTR_DEVICE_LIST, &a, &alen) != 1:
        return configured, free_
    while pos + 4 <= alen:
        c.memcpy(&entry_len, a + pos, 2)
        if entry_len < 4 or pos + entry_len > alen:
            raise ValueError("malformed device list")
        item = a + pos + 4
        ilen = entry_len - 4
        if _find_attr(item, ilen, DEVICE_INDEX, &v, &vlen) == 1 and vlen >= 4:
            index = _attr_uint(v, 4)
            connected = (_find_attr(item, ilen, DEVICE_CONNECTED, &v, &vlen) == 1
                         and vlen >= 1 and v[0] != 0)
            (configured if connected else free_).append(index)
        pos += _align4(entry_len)
    return configured, free_


def find_backend(indexes, backend_id):
    """The first of ``indexes`` whose ``/sys/block/nbdX/backend`` is ``backend_id``, or
    -1. One call for the whole scan, reading sysfs with the GIL released."""
    cdef bytes wanted = backend_id.encode()
    cdef const char *cwanted = wanted
    cdef size_t wanted_len = len(wanted)
    cdef list items = list(indexes)
    cdef int count = len(items)
    cdef int *idx = <int *>malloc((count if count else 1) * sizeof(int))
    cdef int i, n, found = -1
    cdef char path[96]
    cdef char value[512]
    if idx == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            idx[i] = items[i]
        with nogil:
            for i in range(count):
                snprintf(path, sizeof(path), "/sys/block/nbd%d/backend", idx[i])
                n = _read_small_file(path, value, sizeof(value))
                if n == <int>wanted_len and c.memcmp(value, cwanted, wanted_len) == 0:
                    found = idx[i]
                    break
        return found
    finally:
        free(idx)


# ---------------------------------------------------------------------------------------
# NbdNetlink: one generic netlink socket talking to the nbd family
# ---------------------------------------------------------------------------------------

cdef int _open_genl_socket() noexcept nogil:
    cdef int fd = c.socket(c.AF_NETLINK, c.SOCK_RAW | c.SOCK_CLOEXEC, NL_PROTO_GENERIC)
    cdef int one = 1
    if fd < 0:
        return -c.errno
    # Extended acks carry the kernel's error text; capped acks avoid echoing the request.
    c.setsockopt(fd, SOL_NETLINK_LEVEL, NL_OPT_EXT_ACK, &one, sizeof(one))
    c.setsockopt(fd, SOL_NETLINK_LEVEL, NL_OPT_CAP_ACK, &one, sizeof(one))
    return fd


cdef class NbdNetlink:
    """A generic netlink socket bound to the kernel's ``nbd`` family.

    The family and multicast group are resolved once, at construction (or copied from
    another socket with :meth:`clone`). One object serves one thread at a time.
    """

    cdef int fd
    cdef uint32_t seq
    cdef readonly int family_id
    cdef readonly int mcast_group_id
    cdef bint busy
    cdef uint32_t *send_storage
    cdef unsigned char *recv_buffer
    cdef object reply

    def __cinit__(self, family_id=None, mcast_group_id=None):
        cdef int fd
        self.fd = -1
        self.send_storage = <uint32_t *>malloc(SEND_CAPACITY)
        self.recv_buffer = <unsigned char *>malloc(RECV_CAPACITY)
        if self.send_storage == NULL or self.recv_buffer == NULL:
            raise MemoryError()
        with nogil:
            fd = _open_genl_socket()
        if fd < 0:
            raise _os_error(-fd, "cannot open a generic netlink socket")
        self.fd = fd
        self.seq = <uint32_t>(_os.getpid() & 0xFFFF) << 16
        if family_id is None:
            self._resolve()
        else:
            self.family_id = family_id
            self.mcast_group_id = -1 if mcast_group_id is None else mcast_group_id

    def __dealloc__(self):
        if self.fd >= 0:
            c.close(self.fd)
        free(self.send_storage)
        free(self.recv_buffer)

    def clone(self):
        """A new socket for the same family, without resolving it again."""
        self._check_open()
        return NbdNetlink(self.family_id, self.mcast_group_id)

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            c.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    cdef int _check_open(self) except -1:
        if self.fd < 0:
            raise ValueError("netlink socket is closed")
        return 0

    cdef uint32_t _next_seq(self) noexcept:
        self.seq += 1
        if self.seq == 0:
            self.seq = 1
        return self.seq

    cdef int _exchange(self, size_t length, uint32_t seq, str operation) except -1:
        """Send the request in ``send_storage`` and read until the kernel's ack or error
        for ``seq``; the payload of a data reply with that seq lands in ``self.reply``."""
        cdef c.ssize_t n
        cdef int err = 0
        cdef size_t pos
        cdef c.nlmsghdr hdr
        cdef int32_t code
        cdef bint done = False
        if self.busy:
            raise RuntimeError("NbdNetlink used by two threads at once; give each thread "
                               "its own socket (clone())")
        self.busy = True
        self.reply = None
        try:
            while True:
                with nogil:
                    n = c.send(self.fd, self.send_storage, length, 0)
                    if n < 0:
                        err = c.errno
                if n >= 0:
                    break
                if err == c.EINTR:
                    PyErr_CheckSignals()
                    continue
                raise _netlink_error(err, operation, None)
            while not done:
                with nogil:
                    n = c.recv(self.fd, self.recv_buffer, RECV_CAPACITY, 0)
                    if n < 0:
                        err = c.errno
                if n < 0:
                    if err == c.EINTR:
                        PyErr_CheckSignals()
                        continue
                    raise _netlink_error(err, operation, None)
                pos = 0
                while pos + 16 <= <size_t>n:
                    c.memcpy(&hdr, self.recv_buffer + pos, 16)
                    if hdr.nlmsg_len < 16 or pos + hdr.nlmsg_len > <size_t>n:
                        raise NetlinkError(c.EBADMSG, f"nbd netlink {operation}: truncated reply")
                    if hdr.nlmsg_seq == seq:
                        payload = PyBytes_FromStringAndSize(
                            <char *>self.recv_buffer + pos + 16, hdr.nlmsg_len - 16)
                        if hdr.nlmsg_type == NL_MSG_ERROR:
                            code, message = decode_error(payload, hdr.nlmsg_flags)
                            if code != 0:
                                raise _netlink_error(code, operation, message)
                            done = True
                        elif hdr.nlmsg_type == NL_MSG_DONE:
                            done = True
                        elif hdr.nlmsg_type != NL_MSG_NOOP:
                            self.reply = payload
                    pos += _align4(hdr.nlmsg_len)
        finally:
            self.busy = False
        return 0

    cdef int _resolve(self) except -1:
        cdef MsgBuf m
        cdef uint32_t seq = self._next_seq()
        m.data = <unsigned char *>self.send_storage
        m.cap = SEND_CAPACITY
        _build_getfamily(&m, seq, b"nbd", 3)
        try:
            self._exchange(m.length, seq, "family lookup")
        except NetlinkError as exc:
            if exc.errno == c.ENOENT and _os.path.isdir("/sys/module/nbd"):
                # nbd registers its family without netnsok: the kernel has it, this
                # network namespace does not.
                raise NbdFamilyOutsideNamespace(
                    c.ENOENT,
                    "the plugin runs outside the host network namespace; the nbd netlink "
                    "family exists only there: run the node plugin with hostNetwork") from None
            if exc.errno == c.ENOENT:
                raise NbdModuleNotLoaded(
                    c.ENOENT,
                    "the kernel has no 'nbd' generic netlink family: the nbd module is not "
                    "loaded (run `modprobe nbd`, or load it on the node)") from None
            raise
        if self.reply is None:
            raise NetlinkError(c.EBADMSG, "nbd family lookup: no reply from the controller")
        family_id, groups = decode_family(self.reply)
        self.family_id = family_id
        self.mcast_group_id = groups.get("nbd_mc_group", -1)
        return 0

    cdef int _request(self, NbdParams *p, str operation) except -1:
        cdef MsgBuf m
        cdef uint32_t seq
        self._check_open()
        seq = self._next_seq()
        m.data = <unsigned char *>self.send_storage
        m.cap = SEND_CAPACITY
        _build_nbd(&m, <uint16_t>self.family_id, seq, p)
        if m.overflow:
            raise ValueError(f"nbd netlink {operation}: message too long")
        return self._exchange(m.length, seq, operation)

    def connect(self, socket_fds, uint64_t size_bytes, *, block_size=4096, server_flags=0,
                timeout_s=0, dead_conn_timeout_s=0, backend_id=None, index=None,
                client_flags=0):
        """CONNECT: hand negotiated sockets to the kernel; returns the device index.

        Blocks (GIL released) until the kernel has started the device: capacity set,
        ``/sys/block/nbdX/pid`` present. The caller keeps its socket descriptors and
        should close them afterwards: the kernel holds its own references.
        Errors: EPERM (no CAP_SYS_ADMIN), EBUSY (explicit index in use), EINVAL (bad
        block size, or several sockets without CAN_MULTI_CONN in ``server_flags``).
        """
        cdef NbdParams p
        backend = None if backend_id is None else backend_id.encode()
        _fill_params(&p, CMD_CONNECT, index, size_bytes, block_size, timeout_s,
                     dead_conn_timeout_s, server_flags, client_flags, socket_fds, backend)
        if p.nfds == 0:
            raise ValueError("CONNECT needs at least one socket")
        self._request(&p, "CONNECT")
        if self.reply is None:
            raise NetlinkError(c.EBADMSG, "nbd netlink CONNECT: the kernel sent no index")
        return decode_index(self.reply)

    def disconnect(self, uint32_t index):
        """DISCONNECT device ``index``. Blocks until the kernel has shut the sockets down.
        There is no ownership check in the kernel: verify the backend first."""
        cdef NbdParams p
        _fill_params(&p, CMD_DISCONNECT, index, None, None, None, None, None, None, (), None)
        self._request(&p, "DISCONNECT")

    def reconfigure(self, uint32_t index, socket_fds=(), *, backend_id=None, timeout_s=None,
                    dead_conn_timeout_s=None, size_bytes=None):
        """RECONFIGURE: replace dead sockets of ``index`` with fresh negotiated ones, and
        change timeouts or the size. The kernel ignores sockets when none of the device's
        connections is dead. A new size freezes the queue: no I/O may be in flight.
        Errors: EINVAL (not netlink-connected, or backend mismatch), EPERM."""
        cdef NbdParams p
        backend = None if backend_id is None else backend_id.encode()
        _fill_params(&p, CMD_RECONFIGURE, index, size_bytes, None, timeout_s,
                     dead_conn_timeout_s, None, None, socket_fds, backend)
        self._request(&p, "RECONFIGURE")

    def status(self, index=None):
        """STATUS: ``[(index, connected), ...]`` for one device or all. Needs no privilege.
        ``connected`` is true while anything holds the device's configuration (an
        open by udev counts)."""
        cdef NbdParams p
        _fill_params(&p, CMD_STATUS, index, None, None, None, None, None, None, (), None)
        self._request(&p, "STATUS")
        if self.reply is None:
            return []
        return decode_device_list(self.reply)

    def status_split(self):
        """STATUS of all devices as two lists, ``(configured, free)`` indexes, built in C
        (the attach path needs both on every call)."""
        cdef NbdParams p
        _fill_params(&p, CMD_STATUS, None, None, None, None, None, None, None, (), None)
        self._request(&p, "STATUS")
        if self.reply is None:
            return [], []
        return split_device_list(self.reply)

    def transact(self, message):
        """Send raw request bytes (their sequence number is used as is) and return the raw
        reply messages for that sequence number, the final ack included. For diagnostics
        and for capturing kernel replies; the kernel's errors come back as bytes too."""
        cdef const unsigned char[:] view = message
        cdef size_t n = view.shape[0]
        cdef uint32_t seq
        cdef c.ssize_t got
        cdef size_t pos
        cdef c.nlmsghdr hdr
        cdef int err = 0
        self._check_open()
        if n < 16 or n > SEND_CAPACITY:
            raise ValueError("message size out of range")
        c.memcpy(self.send_storage, &view[0], n)
        c.memcpy(&seq, &view[8], 4)
        with nogil:
            got = c.send(self.fd, self.send_storage, n, 0)
            if got < 0:
                err = c.errno
        if got < 0:
            raise _netlink_error(err, "transact", None)
        replies = []
        while True:
            with nogil:
                got = c.recv(self.fd, self.recv_buffer, RECV_CAPACITY, 0)
                if got < 0:
                    err = c.errno
            if got < 0:
                raise _netlink_error(err, "transact", None)
            pos = 0
            finished = False
            while pos + 16 <= <size_t>got:
                c.memcpy(&hdr, self.recv_buffer + pos, 16)
                if hdr.nlmsg_len < 16 or pos + hdr.nlmsg_len > <size_t>got:
                    raise NetlinkError(c.EBADMSG, "transact: truncated reply")
                if hdr.nlmsg_seq == seq:
                    replies.append(PyBytes_FromStringAndSize(
                        <char *>self.recv_buffer + pos, hdr.nlmsg_len))
                    if hdr.nlmsg_type == NL_MSG_ERROR or hdr.nlmsg_type == NL_MSG_DONE:
                        finished = True
                pos += _align4(hdr.nlmsg_len)
            if finished:
                return replies


# ---------------------------------------------------------------------------------------
# LINK_DEAD listener
# ---------------------------------------------------------------------------------------

cdef class LinkDeadListener:
    """A socket subscribed to the nbd multicast group; reports devices whose connection
    died (LINK_DEAD). Use :meth:`fileno` with select/poll, or :meth:`receive`."""

    cdef int fd
    cdef int family_id
    cdef unsigned char *buffer

    def __cinit__(self, int family_id, int mcast_group_id):
        cdef int fd
        cdef int group = mcast_group_id
        cdef c.sockaddr_nl addr
        cdef int rc, err = 0
        self.fd = -1
        self.family_id = family_id
        if mcast_group_id < 0:
            raise ValueError("the nbd family has no multicast group on this kernel")
        self.buffer = <unsigned char *>malloc(RECV_CAPACITY)
        if self.buffer == NULL:
            raise MemoryError()
        c.memset(&addr, 0, sizeof(addr))
        addr.nl_family = c.AF_NETLINK
        with nogil:
            fd = c.socket(c.AF_NETLINK, c.SOCK_RAW | c.SOCK_CLOEXEC | c.SOCK_NONBLOCK,
                          NL_PROTO_GENERIC)
            if fd < 0:
                err = c.errno
            else:
                rc = c.bind(fd, <c.sockaddr *>&addr, sizeof(addr))
                if rc == 0:
                    rc = c.setsockopt(fd, SOL_NETLINK_LEVEL, NL_OPT_ADD_MEMBERSHIP, &group,
                                      sizeof(group))
                if rc < 0:
                    err = c.errno
                    c.close(fd)
                    fd = -1
        if fd < 0:
            raise _os_error(err, "cannot subscribe to the nbd multicast group")
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            c.close(self.fd)
        free(self.buffer)

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            c.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def receive(self, timeout_s=None):
        """Wait up to ``timeout_s`` (None: forever) for LINK_DEAD notifications; returns
        ``[(index, backend_id_or_None), ...]``, empty on timeout. Blocks with the GIL
        released. An index of -1 means notifications were lost (ENOBUFS): re-check every
        device."""
        cdef c.pollfd pfd
        cdef int timeout_ms = -1 if timeout_s is None else <int>(timeout_s * 1000)
        cdef int rc, err = 0
        cdef c.ssize_t n
        cdef size_t pos
        cdef c.nlmsghdr hdr
        if self.fd < 0:
            raise ValueError("listener is closed")
        pfd.fd = self.fd
        pfd.events = c.POLLIN
        with nogil:
            rc = c.poll(&pfd, 1, timeout_ms)
            if rc < 0:
                err = c.errno
        if rc < 0:
            if err == c.EINTR:
                PyErr_CheckSignals()
                return []
            raise _os_error(err, "poll on the LINK_DEAD listener")
        events = []
        while True:
            with nogil:
                n = c.recv(self.fd, self.buffer, RECV_CAPACITY, c.MSG_DONTWAIT)
                if n < 0:
                    err = c.errno
            if n < 0:
                if err == c.EAGAIN or err == c.EWOULDBLOCK:
                    break
                if err == c.ENOBUFS:
                    events.append((-1, None))
                    continue
                if err == c.EINTR:
                    continue
                raise _os_error(err, "receive on the LINK_DEAD listener")
            pos = 0
            while pos + 20 <= <size_t>n:
                c.memcpy(&hdr, self.buffer + pos, 16)
                if hdr.nlmsg_len < 16 or pos + hdr.nlmsg_len > <size_t>n:
                    break
                if (hdr.nlmsg_type == self.family_id
                        and self.buffer[pos + 16] == CMD_LINK_DEAD):
                    payload = PyBytes_FromStringAndSize(
                        <char *>self.buffer + pos + 16, hdr.nlmsg_len - 16)
                    index = decode_index(payload)
                    events.append((index, read_sysfs(index, "backend")))
                pos += _align4(hdr.nlmsg_len)
        return events


# ---------------------------------------------------------------------------------------
# NBD client handshake (fixed newstyle, GO with EXPORT_NAME fallback), GIL released
# ---------------------------------------------------------------------------------------

cdef enum HsKind:
    HS_OK = 0
    HS_SYSTEM = 1       # errno from a system call
    HS_PROTOCOL = 2     # malformed or unexpected bytes from the server
    HS_CLOSED = 3       # server closed the connection
    HS_TIMEOUT = 4
    HS_REPLY = 5        # server answered with an error reply
    HS_UNSUPPORTED = 6  # server lacks something we need
    HS_SPECULATION = 7  # flags sent ahead did not match the server's greeting


cdef struct HsError:
    int kind
    int err
    uint32_t reply_type
    uint32_t option
    char detail[512]


cdef struct HsConn:
    int fd
    double deadline     # CLOCK_MONOTONIC seconds: every read and write stops there
    size_t start
    size_t end
    uint16_t handshake_flags
    uint64_t size_bytes
    uint16_t transmission_flags
    uint32_t min_block
    uint32_t preferred_block
    uint32_t max_block
    bint have_export
    bint used_go
    unsigned char buf[HS_BUFFER]


cdef void _hs_fail(HsError *e, int kind, int err, const char *detail) noexcept nogil:
    if e.kind != HS_OK:
        return
    e.kind = kind
    e.err = err
    snprintf(e.detail, sizeof(e.detail), "%s", detail)


cdef int _hs_wait(HsConn *h, short events, HsError *e, const char *stage) noexcept nogil:
    """Wait until the socket is ready for ``events``, at most until the handshake's
    deadline: 1 ready, 0 interrupted (wait again), -1 with ``e`` set."""
    cdef c.pollfd pfd
    cdef int left = _remaining_ms(h.deadline)
    cdef int rc
    if left <= 0:
        _hs_fail(e, HS_TIMEOUT, c.ETIMEDOUT, stage)
        return -1
    pfd.fd = h.fd
    pfd.events = events
    pfd.revents = 0
    rc = c.poll(&pfd, 1, left)
    if rc > 0:
        return 1
    if rc == 0:
        _hs_fail(e, HS_TIMEOUT, c.ETIMEDOUT, stage)
        return -1
    if c.errno == c.EINTR:
        return 0
    _hs_fail(e, HS_SYSTEM, c.errno, stage)
    return -1


cdef int _hs_read(HsConn *h, void *out, size_t n, HsError *e, const char *stage) noexcept nogil:
    """Read exactly ``n`` bytes through the connection's buffer; 0 or -1 with ``e`` set."""
    cdef size_t have
    cdef c.ssize_t got
    cdef unsigned char *dst = <unsigned char *>out
    cdef int ready
    while n > 0:
        have = h.end - h.start
        if have > 0:
            if have > n:
                have = n
            if dst != NULL:
                c.memcpy(dst, h.buf + h.start, have)
                dst += have
            h.start += have
            n -= have
            continue
        h.start = 0
        h.end = 0
        ready = _hs_wait(h, c.POLLIN, e, stage)
        if ready < 0:
            return -1
        if ready == 0:
            continue
        got = c.recv(h.fd, h.buf, HS_BUFFER, c.MSG_DONTWAIT)
        if got > 0:
            h.end = <size_t>got
        elif got == 0:
            _hs_fail(e, HS_CLOSED, c.ECONNRESET, stage)
            return -1
        elif c.errno == c.EINTR or c.errno == c.EAGAIN or c.errno == c.EWOULDBLOCK:
            continue  # poll again, until the deadline
        else:
            _hs_fail(e, HS_SYSTEM, c.errno, stage)
            return -1
    return 0


cdef int _hs_send(HsConn *h, const void *data, size_t n, HsError *e) noexcept nogil:
    cdef const unsigned char *p = <const unsigned char *>data
    cdef c.ssize_t sent
    cdef int ready
    while n > 0:
        ready = _hs_wait(h, c.POLLOUT, e, "sending to the server")
        if ready < 0:
            return -1
        if ready == 0:
            continue
        sent = c.send(h.fd, p, n, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
        if sent < 0:
            if c.errno == c.EINTR or c.errno == c.EAGAIN or c.errno == c.EWOULDBLOCK:
                continue  # poll again, until the deadline
            _hs_fail(e, HS_SYSTEM, c.errno, "sending to the server")
            return -1
        p += sent
        n -= <size_t>sent
    return 0


cdef inline size_t _put_be16(unsigned char *p, uint16_t v) noexcept nogil:
    v = c.htobe16(v)
    c.memcpy(p, &v, 2)
    return 2


cdef inline size_t _put_be32(unsigned char *p, uint32_t v) noexcept nogil:
    v = c.htobe32(v)
    c.memcpy(p, &v, 4)
    return 4


cdef inline size_t _put_be64(unsigned char *p, uint64_t v) noexcept nogil:
    v = c.htobe64(v)
    c.memcpy(p, &v, 8)
    return 8


cdef inline uint16_t _get_be16(const unsigned char *p) noexcept nogil:
    cdef uint16_t v
    c.memcpy(&v, p, 2)
    return c.be16toh(v)


cdef inline uint32_t _get_be32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    c.memcpy(&v, p, 4)
    return c.be32toh(v)


cdef inline uint64_t _get_be64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    c.memcpy(&v, p, 8)
    return c.be64toh(v)


cdef int _hs_greeting(HsConn *h, HsError *e) noexcept nogil:
    cdef unsigned char g[18]
    if _hs_read(h, g, 16, e, "reading the server greeting") < 0:
        return -1
    if _get_be64(g) != NBDMAGIC:
        _hs_fail(e, HS_PROTOCOL, c.EPROTO, "bad magic in the server greeting: not an NBD server")
        return -1
    if _get_be64(g + 8) == OLDSTYLE_MAGIC:
        _hs_fail(e, HS_UNSUPPORTED, c.EPROTO,
                 "the server speaks the oldstyle NBD handshake, which is not supported")
        return -1
    if _get_be64(g + 8) != IHAVEOPT:
        _hs_fail(e, HS_PROTOCOL, c.EPROTO, "bad magic in the server greeting")
        return -1
    if _hs_read(h, g + 16, 2, e, "reading the server handshake flags") < 0:
        return -1
    h.handshake_flags = _get_be16(g + 16)
    return 0


cdef size_t _option_header(unsigned char *p, uint32_t option, uint32_t length) noexcept nogil:
    _put_be64(p, IHAVEOPT)
    _put_be32(p + 8, option)
    _put_be32(p + 12, length)
    return 16


cdef int _hs_send_flags_and_go(HsConn *h, const char *name, size_t name_len,
                               HsError *e) noexcept nogil:
    """Send the client flags and, on a fixed-newstyle server, NBD_OPT_GO in one write."""
    cdef unsigned char msg[4 + 16 + 4 + 4096 + 2 + 4]
    cdef size_t n = 0
    cdef uint32_t client_flags = 0
    if h.handshake_flags & HS_FLAG_FIXED_NEWSTYLE:
        client_flags |= HS_FLAG_FIXED_NEWSTYLE
    if h.handshake_flags & HS_FLAG_NO_ZEROES:
        client_flags |= HS_FLAG_NO_ZEROES
    n += _put_be32(msg, client_flags)
    if h.handshake_flags & HS_FLAG_FIXED_NEWSTYLE:
        n += _option_header(msg + n, OPT_GO, <uint32_t>(4 + name_len + 2 + 4))
        n += _put_be32(msg + n, <uint32_t>name_len)
        c.memcpy(msg + n, name, name_len)
        n += name_len
        n += _put_be16(msg + n, 2)
        n += _put_be16(msg + n, INFO_EXPORT)
        n += _put_be16(msg + n, INFO_BLOCK_SIZE)
    return _hs_send(h, msg, n, e)


cdef int _hs_export_name(HsConn *h, const char *name, size_t name_len, HsError *e) noexcept nogil:
    """NBD_OPT_EXPORT_NAME: the server answers with size and flags, or closes."""
    cdef unsigned char msg[16 + 4096]
    cdef unsigned char reply[10]
    cdef size_t n = _option_header(msg, OPT_EXPORT_NAME, <uint32_t>name_len)
    c.memcpy(msg + n, name, name_len)
    n += name_len
    if _hs_send(h, msg, n, e) < 0:
        return -1
    if _hs_read(h, reply, 10, e, "NBD_OPT_EXPORT_NAME") < 0:
        if e.kind == HS_CLOSED:
            e.kind = HS_REPLY
            e.reply_type = REP_ERR_UNKNOWN
            e.err = c.ENOENT
            snprintf(e.detail, sizeof(e.detail),
                     "the server closed the connection after NBD_OPT_EXPORT_NAME")
        return -1
    h.size_bytes = _get_be64(reply)
    h.transmission_flags = _get_be16(reply + 8)
    h.have_export = True
    if not (h.handshake_flags & HS_FLAG_NO_ZEROES):
        if _hs_read(h, NULL, 124, e, "reading the export padding") < 0:
            return -1
    return 0


cdef int _hs_reply_error(HsConn *h, uint32_t option, uint32_t rtype, uint32_t length,
                         HsError *e) noexcept nogil:
    """Record an error reply; the server's message (if any) becomes the detail."""
    cdef unsigned char text[400]
    cdef size_t keep = length if length < sizeof(text) - 1 else sizeof(text) - 1
    if length > NBD_MAX_STRING:
        _hs_fail(e, HS_PROTOCOL, c.EPROTO,
                 "an error reply longer than NBD_MAX_STRING (4096 bytes)")
        return -1
    if _hs_read(h, text, keep, e, "reading an error reply") < 0:
        return -1
    if length > keep and _hs_read(h, NULL, length - keep, e, "reading an error reply") < 0:
        return -1
    text[keep] = 0
    e.kind = HS_REPLY
    e.reply_type = rtype
    e.option = option
    if rtype == REP_ERR_UNKNOWN:
        e.err = c.ENOENT
    elif rtype == REP_ERR_POLICY:
        e.err = c.EACCES
    elif rtype == REP_ERR_TLS_REQD:
        e.err = c.EOPNOTSUPP
    elif rtype == REP_ERR_UNSUP:
        e.err = c.EOPNOTSUPP
    elif rtype == REP_ERR_SHUTDOWN:
        e.err = c.ECONNRESET
    else:
        e.err = c.EPROTO
    snprintf(e.detail, sizeof(e.detail), "%s", <char *>text)
    return -1


cdef int _hs_go_replies(HsConn *h, HsError *e) noexcept nogil:
    """Read the replies to NBD_OPT_GO until ACK. Returns 0 done, 1 when the server does
    not support GO (fall back to EXPORT_NAME), -1 on error."""
    cdef unsigned char hdr[20]
    cdef unsigned char info[HS_BUFFER]
    cdef uint32_t option, rtype, length
    cdef size_t keep
    cdef uint16_t info_type
    while True:
        if _hs_read(h, hdr, 20, e, "reading an option reply") < 0:
            return -1
        if _get_be64(hdr) != OPTION_REPLY_MAGIC:
            _hs_fail(e, HS_PROTOCOL, c.EPROTO, "bad magic in an option reply")
            return -1
        option = _get_be32(hdr + 8)
        rtype = _get_be32(hdr + 12)
        length = _get_be32(hdr + 16)
        if option != OPT_GO:
            _hs_fail(e, HS_PROTOCOL, c.EPROTO, "option reply for an option we did not send")
            return -1
        if rtype & REP_ERROR_BIT:
            if rtype == REP_ERR_UNSUP:
                if length > NBD_MAX_STRING:
                    _hs_fail(e, HS_PROTOCOL, c.EPROTO,
                             "an error reply longer than NBD_MAX_STRING (4096 bytes)")
                    return -1
                if _hs_read(h, NULL, length, e, "reading an error reply") < 0:
                    return -1
                return 1
            _hs_reply_error(h, option, rtype, length, e)
            return -1
        if rtype == REP_ACK:
            if length != 0:
                _hs_fail(e, HS_PROTOCOL, c.EPROTO, "NBD_REP_ACK with a payload")
                return -1
            if not h.have_export:
                _hs_fail(e, HS_PROTOCOL, c.EPROTO,
                         "the server finished NBD_OPT_GO without NBD_INFO_EXPORT")
                return -1
            h.used_go = True
            return 0
        if rtype != REP_INFO:
            _hs_fail(e, HS_PROTOCOL, c.EPROTO, "unexpected reply type to NBD_OPT_GO")
            return -1
        if length > HS_MAX_INFO:
            # The longest information, a name or description, is one NBD_MAX_STRING.
            _hs_fail(e, HS_PROTOCOL, c.EPROTO,
                     "an NBD_REP_INFO longer than a type and NBD_MAX_STRING (4098 bytes)")
            return -1
        keep = length if length < HS_BUFFER else HS_BUFFER
        if _hs_read(h, info, keep, e, "reading NBD_REP_INFO") < 0:
            return -1
        if length > keep and _hs_read(h, NULL, length - keep, e, "reading NBD_REP_INFO") < 0:
            return -1
        if keep < 2:
            _hs_fail(e, HS_PROTOCOL, c.EPROTO, "NBD_REP_INFO without a type")
            return -1
        info_type = _get_be16(info)
        if info_type == INFO_EXPORT:
            if keep < 12:
                _hs_fail(e, HS_PROTOCOL, c.EPROTO, "short NBD_INFO_EXPORT")
                return -1
            h.size_bytes = _get_be64(info + 2)
            h.transmission_flags = _get_be16(info + 10)
            h.have_export = True
        elif info_type == INFO_BLOCK_SIZE:
            if keep < 14:
                _hs_fail(e, HS_PROTOCOL, c.EPROTO, "short NBD_INFO_BLOCK_SIZE")
                return -1
            h.min_block = _get_be32(info + 2)
            h.preferred_block = _get_be32(info + 6)
            h.max_block = _get_be32(info + 10)
        # Other information types (name, description) are ignored, as the protocol asks.


cdef int _hs_after_greeting(HsConn *h, int assumed_flags, const char *name, size_t name_len,
                            HsError *e) noexcept nogil:
    """Read the greeting; then send the client flags and GO, unless they were sent ahead
    on the strength of ``assumed_flags``, which must then match what the server offers."""
    if _hs_greeting(h, e) < 0:
        return -1
    if assumed_flags < 0:
        return _hs_send_flags_and_go(h, name, name_len, e)
    if h.handshake_flags != <uint16_t>assumed_flags:
        _hs_fail(e, HS_SPECULATION, c.EAGAIN,
                 "the server's handshake flags changed since the last connection")
        return -1
    return 0


cdef int _hs_finish_many(HsConn **conns, int count, int assumed_flags, const char *name,
                         size_t name_len, HsError *errors) noexcept nogil:
    """Negotiate every connection, pipelined: each phase is sent on all sockets before
    any answer is awaited, so N connections cost about one round trip set, not N."""
    cdef int i, rc
    cdef int failed = 0
    for i in range(count):
        if _hs_after_greeting(conns[i], assumed_flags, name, name_len, &errors[i]) < 0:
            failed = 1
    if failed:
        return -1
    for i in range(count):
        if conns[i].handshake_flags & HS_FLAG_FIXED_NEWSTYLE:
            rc = _hs_go_replies(conns[i], &errors[i])
            if rc < 0:
                failed = 1
                continue
            if rc == 0:
                continue
        if _hs_export_name(conns[i], name, name_len, &errors[i]) < 0:
            failed = 1
    return -1 if failed else 0


cdef int _set_timeouts(int fd, double timeout_s) noexcept nogil:
    cdef c.timeval tv
    tv.tv_sec = <c.time_t>timeout_s
    tv.tv_usec = <c.suseconds_t>((timeout_s - <double>tv.tv_sec) * 1e6)
    if c.setsockopt(fd, c.SOL_SOCKET, c.SO_RCVTIMEO, &tv, sizeof(tv)) < 0:
        return -1
    if c.setsockopt(fd, c.SOL_SOCKET, c.SO_SNDTIMEO, &tv, sizeof(tv)) < 0:
        return -1
    return 0


cdef int _open_unix(const char *path, double deadline, HsError *e) noexcept nogil:
    cdef c.sockaddr_un addr
    cdef size_t n = c.strlen(path)
    cdef int fd
    cdef double timeout_s = deadline - _now()
    if timeout_s <= 0:
        _hs_fail(e, HS_TIMEOUT, c.ETIMEDOUT, "connecting to the NBD server socket")
        return -1
    if n >= sizeof(addr.sun_path):
        _hs_fail(e, HS_SYSTEM, c.EINVAL, "unix socket path too long")
        return -1
    c.memset(&addr, 0, sizeof(addr))
    addr.sun_family = c.AF_UNIX
    c.memcpy(addr.sun_path, path, n)
    fd = c.socket(c.AF_UNIX, c.SOCK_STREAM | c.SOCK_CLOEXEC, 0)
    if fd < 0:
        _hs_fail(e, HS_SYSTEM, c.errno, "socket(AF_UNIX)")
        return -1
    if _set_timeouts(fd, timeout_s) < 0:
        _hs_fail(e, HS_SYSTEM, c.errno, "setting socket timeouts")
        c.close(fd)
        return -1
    while c.connect(fd, <c.sockaddr *>&addr, sizeof(addr)) < 0:
        if c.errno == c.EINTR:
            continue
        _hs_fail(e, HS_SYSTEM, c.errno, "connecting to the NBD server socket")
        c.close(fd)
        return -1
    return fd


cdef int _open_tcp(const char *host, const char *port, double deadline, HsError *e) noexcept nogil:
    cdef c.addrinfo hints
    cdef c.addrinfo *res = NULL
    cdef c.addrinfo *ai
    cdef int fd = -1
    cdef int one = 1
    cdef int rc
    cdef int last_err = c.ECONNREFUSED
    c.memset(&hints, 0, sizeof(hints))
    hints.ai_family = c.AF_UNSPEC
    hints.ai_socktype = c.SOCK_STREAM
    rc = c.getaddrinfo(host, port, &hints, &res)
    if rc != 0:
        _hs_fail(e, HS_SYSTEM, c.EINVAL, c.gai_strerror(rc))
        return -1
    ai = res
    while ai != NULL:
        fd = c.socket(ai.ai_family, ai.ai_socktype | c.SOCK_CLOEXEC, ai.ai_protocol)
        if fd >= 0:
            # The kernel client sends small requests; Nagle would delay them.
            c.setsockopt(fd, c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))
            if deadline - _now() <= 0:
                c.close(fd)
                fd = -1
                last_err = c.ETIMEDOUT
                break
            _set_timeouts(fd, deadline - _now())
            if c.connect(fd, ai.ai_addr, ai.ai_addrlen) == 0:
                break
            last_err = c.errno
            c.close(fd)
            fd = -1
        else:
            last_err = c.errno
        ai = ai.ai_next
    c.freeaddrinfo(res)
    if fd < 0:
        _hs_fail(e, HS_SYSTEM, last_err, "connecting to the NBD server")
    return fd


# A handshake takes milliseconds; a deadline beyond this is a mistake, not a wait.
cdef double MAX_HANDSHAKE_TIMEOUT_S = 3600.0


cdef double _handshake_deadline(double timeout_s) except? -1.0:
    """The CLOCK_MONOTONIC deadline ``timeout_s`` from now; ValueError unless finite,
    positive and at most MAX_HANDSHAKE_TIMEOUT_S (NaN fails every comparison)."""
    if not (0.0 < timeout_s <= MAX_HANDSHAKE_TIMEOUT_S):
        raise ValueError(f"handshake timeout must be more than 0 and at most "
                         f"{MAX_HANDSHAKE_TIMEOUT_S:g} s, got {timeout_s}")
    return _now() + timeout_s


cdef object _handshake_exception(HsError *e, object address, object export_name):
    detail = e.detail.decode("utf-8", "replace")
    where = f"NBD server {address!r}"
    if e.kind == HS_REPLY:
        if e.reply_type == REP_ERR_UNKNOWN:
            text = f"{where} has no export named {export_name!r}"
            if detail:
                text += f" ({detail})"
            return ExportNotFound(c.ENOENT, text)
        if e.reply_type == REP_ERR_POLICY:
            text = f"{where} refused export {export_name!r} by policy"
        elif e.reply_type == REP_ERR_TLS_REQD:
            text = f"{where} requires TLS, which this client does not speak"
        elif e.reply_type == REP_ERR_UNSUP:
            text = f"{where} does not support a required option"
        elif e.reply_type == REP_ERR_SHUTDOWN:
            text = f"{where} is shutting down"
        else:
            text = f"{where} answered option {e.option} with error 0x{e.reply_type:08x}"
        if detail and e.reply_type != REP_ERR_UNKNOWN:
            text += f": {detail}"
        return HandshakeError(e.err, text)
    if e.kind == HS_CLOSED:
        return HandshakeError(e.err, f"{where} closed the connection while {detail} "
                                     "(short read)")
    if e.kind == HS_TIMEOUT:
        return HandshakeError(e.err, f"{where} did not finish the handshake in time "
                                     f"(stopped while {detail})")
    if e.kind == HS_SYSTEM:
        text = f"{where}: {detail}: {_os.strerror(e.err)}"
        if e.err == c.ENOENT or e.err == c.ECONNREFUSED:
            text += " (is the server running and listening there?)"
        return HandshakeError(e.err, text)
    return HandshakeError(e.err, f"{where}: {detail}")


cdef class Negotiated:
    """Sockets that finished the NBD handshake, ready for CONNECT or RECONFIGURE.

    Owns the descriptors until :meth:`close`; after CONNECT the kernel holds its own
    references, so close them then.
    """

    cdef list _fds
    cdef readonly uint64_t size_bytes
    cdef readonly uint16_t transmission_flags
    cdef readonly uint16_t handshake_flags
    cdef readonly uint32_t min_block_size
    cdef readonly uint32_t preferred_block_size
    cdef readonly uint32_t max_block_size
    cdef readonly bint used_go
    cdef readonly object export_name

    def __cinit__(self):
        self._fds = []

    @property
    def socket_fds(self):
        return tuple(self._fds)

    @property
    def can_multi_conn(self):
        return bool(self.transmission_flags & TFLAG_CAN_MULTI_CONN)

    def close(self):
        fds, self._fds = self._fds, []
        for fd in fds:
            c.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __dealloc__(self):
        if self._fds:
            for fd in self._fds:
                c.close(fd)

    def __repr__(self):
        return (f"Negotiated(export={self.export_name!r}, size={self.size_bytes}, "
                f"flags=0x{self.transmission_flags:x}, sockets={len(self._fds)})")


cdef class Handshake:
    """An NBD handshake in two steps, so that the caller can do its own work while the
    server accepts: the constructor connects the sockets (and, given the server's
    handshake flags from an earlier connection, already sends the client flags and
    NBD_OPT_GO, saving a round trip); :meth:`finish` completes the negotiation.

    Both steps block with the GIL released. ``timeout_s`` is one deadline for the whole
    handshake, set by the constructor: the caller's work between the steps counts.
    Errors are those of :func:`negotiate`. A handshake whose early flags turn out wrong
    fails with HandshakeError(EAGAIN): retry without them.
    """

    cdef HsConn **conns
    cdef HsError *errors
    cdef int n
    cdef int assumed_flags
    cdef bytes name
    cdef object address
    cdef object export_name
    cdef bint finished

    def __cinit__(self, address, export_name, int connections=1, double timeout_s=10.0,
                  int assume_handshake_flags=-1):
        cdef bytes path_b = b""
        cdef bytes host_b = b""
        cdef bytes port_b = b""
        cdef const char *cpath
        cdef const char *chost
        cdef const char *cport
        cdef const char *cname
        cdef size_t name_len
        cdef bint is_tcp
        cdef int i, rc = 0, n = connections
        cdef int assumed = assume_handshake_flags
        cdef double deadline
        self.conns = NULL
        self.errors = NULL
        self.n = 0
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, got {connections}")
        deadline = _handshake_deadline(timeout_s)
        self.name = export_name.encode()
        if len(self.name) > 4096:
            raise ValueError("export name longer than 4096 bytes")
        if assumed >= 0 and not (assumed & HS_FLAG_FIXED_NEWSTYLE):
            assumed = -1  # only a fixed-newstyle server may be sent options ahead
        self.assumed_flags = assumed
        self.address = address
        self.export_name = export_name
        is_tcp = isinstance(address, tuple)
        if is_tcp:
            host_b = str(address[0]).encode()
            port_b = str(int(address[1])).encode()
        else:
            path_b = _os.fsencode(address)
        cpath = path_b
        chost = host_b
        cport = port_b
        cname = self.name
        name_len = len(self.name)
        self.conns = <HsConn **>malloc(n * sizeof(HsConn *))
        self.errors = <HsError *>malloc(n * sizeof(HsError))
        if self.conns == NULL or self.errors == NULL:
            raise MemoryError()
        c.memset(self.conns, 0, n * sizeof(HsConn *))
        c.memset(self.errors, 0, n * sizeof(HsError))
        self.n = n
        for i in range(n):
            self.conns[i] = <HsConn *>malloc(sizeof(HsConn))
            if self.conns[i] == NULL:
                raise MemoryError()
            c.memset(self.conns[i], 0, sizeof(HsConn) - HS_BUFFER)
            self.conns[i].fd = -1
            self.conns[i].deadline = deadline
        with nogil:
            for i in range(n):
                if is_tcp:
                    self.conns[i].fd = _open_tcp(chost, cport, deadline, &self.errors[i])
                else:
                    self.conns[i].fd = _open_unix(cpath, deadline, &self.errors[i])
                if self.conns[i].fd < 0:
                    rc = -1
                    break
                if assumed >= 0:
                    self.conns[i].handshake_flags = <uint16_t>assumed
                    if _hs_send_flags_and_go(self.conns[i], cname, name_len,
                                             &self.errors[i]) < 0:
                        rc = -1
                        break
        if rc < 0:
            self._raise_first()

    cdef int _raise_first(self) except -1:
        cdef int i
        for i in range(self.n):
            if self.errors[i].kind != HS_OK:
                exc = _handshake_exception(&self.errors[i], self.address, self.export_name)
                self.close()
                raise exc
        self.close()
        raise HandshakeError(c.EPROTO, f"NBD handshake with {self.address!r} failed")

    def finish(self):
        """Complete the negotiation; returns :class:`Negotiated`, which then owns the
        sockets. Blocks with the GIL released."""
        cdef int i, rc = 0, n = self.n
        cdef const char *cname
        cdef size_t name_len
        cdef c.timeval zero
        if self.finished or self.conns == NULL:
            raise ValueError("handshake already finished or closed")
        self.finished = True
        cname = self.name
        name_len = len(self.name)
        zero.tv_sec = 0
        zero.tv_usec = 0
        with nogil:
            rc = _hs_finish_many(self.conns, n, self.assumed_flags, cname, name_len,
                                 self.errors)
            if rc == 0:
                # The kernel's receive thread must block indefinitely on these sockets.
                for i in range(n):
                    if (c.setsockopt(self.conns[i].fd, c.SOL_SOCKET, c.SO_RCVTIMEO, &zero,
                                     sizeof(zero)) < 0
                            or c.setsockopt(self.conns[i].fd, c.SOL_SOCKET, c.SO_SNDTIMEO,
                                            &zero, sizeof(zero)) < 0):
                        _hs_fail(&self.errors[i], HS_SYSTEM, c.errno,
                                 "clearing socket timeouts")
                        rc = -1
                        break
        if rc < 0:
            self._raise_first()
        for i in range(1, n):
            if (self.conns[i].size_bytes != self.conns[0].size_bytes
                    or self.conns[i].transmission_flags != self.conns[0].transmission_flags):
                address = self.address
                self.close()
                raise HandshakeError(c.EPROTO, f"NBD server {address!r} reported different "
                                               "sizes or flags on its connections")
        result = Negotiated()
        result.size_bytes = self.conns[0].size_bytes
        result.transmission_flags = self.conns[0].transmission_flags
        result.handshake_flags = self.conns[0].handshake_flags
        result.min_block_size = self.conns[0].min_block
        result.preferred_block_size = self.conns[0].preferred_block
        result.max_block_size = self.conns[0].max_block
        result.used_go = self.conns[0].used_go
        result.export_name = self.export_name
        for i in range(n):
            result._fds.append(self.conns[i].fd)
            self.conns[i].fd = -1
        self.close()
        return result

    def close(self):
        """Abandon the handshake and close its sockets (idempotent)."""
        cdef int i
        if self.conns != NULL:
            for i in range(self.n):
                if self.conns[i] != NULL:
                    if self.conns[i].fd >= 0:
                        c.close(self.conns[i].fd)
                    free(self.conns[i])
            free(self.conns)
            self.conns = NULL
        free(self.errors)
        self.errors = NULL

    def __dealloc__(self):
        self.close()


def negotiate(address, export_name, int connections=1, double timeout_s=10.0,
              int assume_handshake_flags=-1):
    """Open ``connections`` sockets to ``address`` (a unix socket path, or a
    ``(host, port)`` tuple for TCP with TCP_NODELAY) and negotiate ``export_name`` on
    each: fixed newstyle, NO_ZEROES when offered, NBD_OPT_GO asking for INFO_EXPORT and
    INFO_BLOCK_SIZE, NBD_OPT_EXPORT_NAME only when GO is unsupported. Never negotiates
    structured replies (the kernel client speaks simple replies only).

    Blocks with the GIL released, the whole handshake (connects, every request and
    reply, on every socket) bounded by ``timeout_s`` (more than 0, at most 3600 s, else
    ValueError), so a server that keeps sending cannot hold it; a reply longer than the
    protocol allows (NBD_MAX_STRING, 4096 bytes, for a name or message) is EPROTO.
    Raises ExportNotFound (ENOENT) for an unknown export, HandshakeError with EACCES
    (policy), EOPNOTSUPP (TLS required), EPROTO (bad magic, protocol violation, a reply
    too long), ECONNRESET (short read), ETIMEDOUT (the deadline passed), EAGAIN
    (``assume_handshake_flags`` was wrong), or the errno of connect (ENOENT,
    ECONNREFUSED).
    """
    return Handshake(address, export_name, connections, timeout_s,
                     assume_handshake_flags).finish()


def list_exports(address, double timeout_s=10.0):
    """NBD_OPT_LIST, for diagnostics: ``[(name, description), ...]``. Ends the session
    with NBD_OPT_ABORT. Blocks with the GIL released, all of it bounded by ``timeout_s``;
    errors as for :func:`negotiate`."""
    cdef HsConn *h
    cdef HsError e
    cdef bytes path_b = b""
    cdef bytes host_b = b""
    cdef bytes port_b = b""
    cdef bint is_tcp = isinstance(address, tuple)
    cdef unsigned char msg[4 + 16]
    cdef unsigned char hdr[20]
    cdef unsigned char *data
    cdef uint32_t rtype, length, name_len
    cdef size_t n
    cdef int rc = 0
    cdef const char *cpath
    cdef const char *chost
    cdef const char *cport
    cdef double deadline = _handshake_deadline(timeout_s)
    if is_tcp:
        host_b = str(address[0]).encode()
        port_b = str(int(address[1])).encode()
    else:
        path_b = _os.fsencode(address)
    cpath = path_b
    chost = host_b
    cport = port_b
    h = <HsConn *>malloc(sizeof(HsConn))
    data = <unsigned char *>malloc(HS_MAX_LIST_ENTRY)
    if h == NULL or data == NULL:
        free(h)
        free(data)
        raise MemoryError()
    c.memset(h, 0, sizeof(HsConn) - HS_BUFFER)
    c.memset(&e, 0, sizeof(e))
    h.deadline = deadline
    exports = []
    try:
        with nogil:
            if is_tcp:
                h.fd = _open_tcp(chost, cport, deadline, &e)
            else:
                h.fd = _open_unix(cpath, deadline, &e)
            if h.fd < 0 or _hs_greeting(h, &e) < 0:
                rc = -1
            elif not (h.handshake_flags & HS_FLAG_FIXED_NEWSTYLE):
                _hs_fail(&e, HS_UNSUPPORTED, c.EOPNOTSUPP,
                         "the server is not fixed-newstyle and cannot list exports")
                rc = -1
            else:
                n = _put_be32(msg, HS_FLAG_FIXED_NEWSTYLE
                              | (h.handshake_flags & HS_FLAG_NO_ZEROES))
                n += _option_header(msg + n, OPT_LIST, 0)
                rc = _hs_send(h, msg, n, &e)
        if rc < 0:
            raise _handshake_exception(&e, address, "")
        while True:
            with nogil:
                rc = _hs_read(h, hdr, 20, &e, "reading the export list")
            if rc < 0:
                raise _handshake_exception(&e, address, "")
            if _get_be64(hdr) != OPTION_REPLY_MAGIC:
                raise HandshakeError(c.EPROTO, f"bad magic in the export list of {address!r}")
            rtype = _get_be32(hdr + 12)
            length = _get_be32(hdr + 16)
            if length > HS_MAX_LIST_ENTRY:
                raise HandshakeError(c.EPROTO, f"an export list entry from {address!r} is "
                                               "longer than a name and a description of "
                                               "NBD_MAX_STRING (4096 bytes) each")
            if rtype & REP_ERROR_BIT:
                with nogil:
                    _hs_reply_error(h, OPT_LIST, rtype, length, &e)
                raise _handshake_exception(&e, address, "")
            with nogil:
                rc = _hs_read(h, data, length, &e, "reading the export list")
            if rc < 0:
                raise _handshake_exception(&e, address, "")
            if rtype == REP_ACK:
                break
            if rtype == REP_SERVER and length >= 4:
                name_len = _get_be32(data)
                if name_len > length - 4 or name_len > NBD_MAX_STRING:
                    raise HandshakeError(c.EPROTO, f"malformed export list from {address!r}")
                exports.append(((<char *>data)[4:4 + name_len].decode("utf-8", "replace"),
                                (<char *>data)[4 + name_len:length].decode("utf-8",
                                                                           "replace")))
        n = _option_header(msg, OPT_ABORT, 0)
        with nogil:
            _hs_send(h, msg, n, &e)
        return exports
    finally:
        if h.fd >= 0:
            c.close(h.fd)
        free(h)
        free(data)


# ---------------------------------------------------------------------------------------
# Device facts from sysfs and the block layer (no exec)
# ---------------------------------------------------------------------------------------

def read_sysfs(int index, str name):
    """Contents of ``/sys/block/nbd<index>/<name>`` without the newline, or None when the
    file does not exist (``backend`` and ``pid`` exist only while connected)."""
    cdef char path[128]
    cdef char value[512]
    cdef int n
    cdef bytes name_b = name.encode()
    cdef const char *cname = name_b
    snprintf(path, sizeof(path), "/sys/block/nbd%d/%s", index, cname)
    with nogil:
        n = _read_small_file(path, value, sizeof(value))
    if n == -c.ENOENT or n == -c.ENODEV:
        return None
    if n < 0:
        raise _os_error(-n, "cannot read sysfs", path.decode())
    return value[:n].decode("utf-8", "replace")


def block_device_size(path):
    """BLKGETSIZE64 of a block device node, in bytes. Opens it read-only (no udev watch
    event); raises OSError with the errno of open or ioctl."""
    cdef bytes path_b = _os.fsencode(path)
    cdef const char *cpath = path_b
    cdef int fd, err = 0
    cdef uint64_t size = 0
    with nogil:
        fd = c.open(cpath, c.O_RDONLY | c.O_CLOEXEC | c.O_NONBLOCK)
        if fd < 0:
            err = c.errno
        elif c.ioctl(fd, IOCTL_BLKGETSIZE64, &size) < 0:
            err = c.errno
        if fd >= 0:
            c.close(fd)
    if err:
        raise _os_error(err, "cannot read the device size", path)
    return size


cdef int _ensure_node(int index, const char *path) noexcept nogil:
    """Create the device node from /sys/block/nbdX/dev when /dev lacks it (a /dev that is
    not devtmpfs). Returns 0 or -errno."""
    cdef char sys_path[96]
    cdef char value[32]
    cdef unsigned int major = 0, minor = 0
    cdef int n, i
    snprintf(sys_path, sizeof(sys_path), "/sys/block/nbd%d/dev", index)
    n = _read_small_file(sys_path, value, sizeof(value))
    if n < 0:
        return n
    i = 0
    while i < n and value[i] != b':':
        major = major * 10 + <unsigned int>(value[i] - 48)
        i += 1
    i += 1
    while i < n:
        minor = minor * 10 + <unsigned int>(value[i] - 48)
        i += 1
    if c.mknod(path, <c.mode_t>(c.S_IFBLK | 0o600), c.makedev(major, minor)) < 0 \
            and c.errno != c.EEXIST:
        return -c.errno
    return 0


# ---------------------------------------------------------------------------------------
# Readiness: kernel uevent, capacity, node, and udev's probe (whole-disk flock)
# ---------------------------------------------------------------------------------------

cdef class UeventWatch:
    """Kernel uevents (NETLINK_KOBJECT_UEVENT group 1), opened before CONNECT so the
    device's change event cannot be missed. ``available`` is false where the socket
    cannot be opened (then readiness relies on capacity and the lock alone)."""

    cdef int fd
    cdef unsigned char *buffer

    def __cinit__(self):
        cdef c.sockaddr_nl addr
        cdef int fd
        self.fd = -1
        self.buffer = <unsigned char *>malloc(8192)
        if self.buffer == NULL:
            raise MemoryError()
        c.memset(&addr, 0, sizeof(addr))
        addr.nl_family = c.AF_NETLINK
        addr.nl_groups = 1
        with nogil:
            fd = c.socket(c.AF_NETLINK, c.SOCK_DGRAM | c.SOCK_CLOEXEC | c.SOCK_NONBLOCK,
                          NL_PROTO_KOBJECT_UEVENT)
            if fd >= 0 and c.bind(fd, <c.sockaddr *>&addr, sizeof(addr)) < 0:
                c.close(fd)
                fd = -1
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            c.close(self.fd)
        free(self.buffer)

    @property
    def available(self):
        return self.fd >= 0

    def close(self):
        if self.fd >= 0:
            c.close(self.fd)
            self.fd = -1

    cdef int wait_change(self, int index, double deadline) noexcept nogil:
        """1 when a change event for nbd<index> arrived, 0 on timeout, -errno on error,
        -ENOBUFS when events were dropped (the caller cannot know)."""
        cdef char suffix[32]
        cdef size_t slen
        cdef c.ssize_t n
        cdef c.pollfd pfd
        cdef size_t first
        cdef int rc
        if self.fd < 0:
            return -c.ENODEV
        slen = <size_t>snprintf(suffix, sizeof(suffix), "/block/nbd%d", index)
        pfd.fd = self.fd
        pfd.events = c.POLLIN
        while True:
            n = c.recv(self.fd, self.buffer, 8191, c.MSG_DONTWAIT)
            if n < 0:
                if c.errno == c.EINTR:
                    continue
                if c.errno == c.ENOBUFS:
                    return -c.ENOBUFS
                if c.errno != c.EAGAIN and c.errno != c.EWOULDBLOCK:
                    return -c.errno
                rc = c.poll(&pfd, 1, _remaining_ms(deadline))
                if rc == 0:
                    return 0
                if rc < 0 and c.errno != c.EINTR:
                    return -c.errno
                continue
            self.buffer[n] = 0
            first = c.strlen(<char *>self.buffer)
            if (first > 7 + slen and c.memcmp(self.buffer, b"change@", 7) == 0
                    and c.memcmp(self.buffer + first - slen, suffix, slen) == 0):
                return 1


cdef int _wait_unlocked(int fd, const char *path, double deadline) noexcept nogil:
    """Take LOCK_EX on the whole disk, waiting while udev's worker holds its shared lock.

    Woken by inotify close events on the node: udevd's worker drops the lock by closing
    its descriptor. A holder that unlocks without a close (flock(LOCK_UN), or a
    descriptor shared with a child) raises no event, so the wait also re-checks on a
    backoff from 10 ms up to 250 ms. 0 locked, 1 timeout, -errno."""
    cdef int ino, rc, wait_ms
    cdef int backoff_ms = 10
    cdef c.pollfd pfd
    cdef unsigned char events[1024]
    if c.flock(fd, c.LOCK_EX | c.LOCK_NB) == 0:
        return 0
    if c.errno != c.EWOULDBLOCK:
        return -c.errno
    ino = c.inotify_init1(c.IN_CLOEXEC | c.IN_NONBLOCK)
    if ino < 0:
        return -c.errno
    if c.inotify_add_watch(ino, path, c.IN_CLOSE_NOWRITE | c.IN_CLOSE_WRITE) < 0:
        rc = -c.errno
        c.close(ino)
        return rc
    pfd.fd = ino
    pfd.events = c.POLLIN
    rc = 1
    while True:
        # Re-check after arming the watch: the holder may have closed in between.
        if c.flock(fd, c.LOCK_EX | c.LOCK_NB) == 0:
            rc = 0
            break
        if c.errno != c.EWOULDBLOCK:
            rc = -c.errno
            break
        wait_ms = _remaining_ms(deadline)
        if wait_ms == 0:
            rc = 1
            break
        if wait_ms > backoff_ms:
            wait_ms = backoff_ms
        if c.poll(&pfd, 1, wait_ms) > 0:
            while c.read(ino, events, sizeof(events)) > 0:
                pass
        elif backoff_ms < 250:
            backoff_ms *= 2
    c.close(ino)
    return rc


def wait_ready(int index, uint64_t size_bytes, double timeout_s=10.0, *,
               UeventWatch watch=None, bint keep_lock=False, str dev_dir="/dev"):
    """Make sure ``/dev/nbd<index>`` is usable: the node exists (created with mknod from
    sysfs when /dev is not devtmpfs), the kernel's change uevent was emitted (when a
    ``watch`` opened before CONNECT is given), the capacity equals ``size_bytes``
    (rounded down to 512), and no udev probe holds the disk: LOCK_EX on the whole disk,
    the lock udevd takes shared while it probes.

    Returns the open read-only descriptor holding LOCK_EX when ``keep_lock`` (udev
    postpones its probe until that descriptor is closed; keep it across mkfs and
    mount), else None. Costs a few system calls when nothing is pending. Blocks with the
    GIL released, at most ``timeout_s``. Raises DeviceNotReady (ETIMEDOUT, or EIO for a
    capacity mismatch) or NbdError with the errno of open/mknod/ioctl.
    """
    cdef bytes path_b = _os.fsencode(f"{dev_dir}/nbd{index}")
    cdef const char *path = path_b
    cdef double deadline = _now() + timeout_s
    cdef uint64_t expected = size_bytes - size_bytes % 512
    cdef uint64_t actual = 0
    cdef int fd = -1, err = 0, rc = 0, stage = 0, seen = 0
    cdef bint has_watch = watch is not None
    with nogil:
        fd = c.open(path, c.O_RDONLY | c.O_CLOEXEC | c.O_NONBLOCK)
        if fd < 0 and c.errno == c.ENOENT:
            rc = _ensure_node(index, path)
            if rc < 0:
                err = -rc
            else:
                fd = c.open(path, c.O_RDONLY | c.O_CLOEXEC | c.O_NONBLOCK)
        if fd < 0 and err == 0:
            err = c.errno
        if err == 0:
            # Capacity first: on the netlink path it is set before the CONNECT reply, and
            # the change event was emitted with it. On the ioctl path the event marks the
            # moment DO_IT has started the device.
            stage = 1
            while True:
                if c.ioctl(fd, IOCTL_BLKGETSIZE64, &actual) < 0:
                    err = c.errno
                    break
                if actual == expected and (not has_watch or seen):
                    break
                if not has_watch:
                    break
                rc = watch.wait_change(index, deadline)
                if rc == 1:
                    seen = 1
                    continue
                if rc == -c.ENOBUFS:
                    # Events were dropped (the queue is empty again): capacity decides,
                    # and later events still wake us.
                    seen = 1
                    continue
                if rc == -c.ENODEV:
                    # No uevent socket: nothing to wait on, capacity alone decides.
                    break
                if rc == 0:
                    err = c.ETIMEDOUT
                else:
                    err = -rc
                break
        if err == 0 and actual == expected:
            stage = 2
            rc = _wait_unlocked(fd, path, deadline)
            if rc == 1:
                err = c.ETIMEDOUT
            elif rc < 0:
                err = -rc
    if err == 0 and actual != expected:
        c.close(fd)
        raise DeviceNotReady(c.EIO, f"{path_b.decode()} has {actual} bytes, expected "
                                    f"{expected}", path_b.decode())
    if err:
        if fd >= 0:
            c.close(fd)
        if err == c.ETIMEDOUT:
            what = ("the kernel's change event did not arrive" if stage == 1
                    else "udev is still probing the device")
            raise DeviceNotReady(err, f"{path_b.decode()} not ready after {timeout_s} s: "
                                      f"{what}", path_b.decode())
        raise _os_error(err, f"{path_b.decode()} not usable", path_b.decode())
    if keep_lock:
        return fd
    c.close(fd)
    return None


# ---------------------------------------------------------------------------------------
# ioctl fallback (kernels or setups without nbd netlink)
# ---------------------------------------------------------------------------------------

cdef class IoctlDevice:
    """One /dev/nbdX driven through the legacy ioctls. :meth:`run` (NBD_DO_IT) blocks for
    the whole life of the connection: call it on a dedicated thread."""

    cdef int fd
    cdef readonly int index
    cdef readonly object path

    def __cinit__(self, int index, str dev_dir="/dev"):
        cdef bytes path_b = _os.fsencode(f"{dev_dir}/nbd{index}")
        cdef const char *cpath = path_b
        cdef int fd, err = 0
        self.fd = -1
        self.index = index
        self.path = path_b.decode()
        with nogil:
            fd = c.open(cpath, c.O_RDWR | c.O_CLOEXEC)
            if fd < 0 and c.errno == c.ENOENT:
                err = -_ensure_node(index, cpath)
                if err == 0:
                    fd = c.open(cpath, c.O_RDWR | c.O_CLOEXEC)
            if fd < 0 and err == 0:
                err = c.errno
        if fd < 0:
            raise _os_error(err, "cannot open the NBD device", self.path)
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            c.close(self.fd)

    cdef int _ioctl(self, unsigned long request, unsigned long arg, str what) except -1:
        cdef int rc, err = 0
        if self.fd < 0:
            raise ValueError("device is closed")
        with nogil:
            rc = c.ioctl(self.fd, request, arg)
            if rc < 0:
                err = c.errno
        if rc < 0:
            if err == c.EBUSY:
                raise DeviceBusy(err, f"{what} on {self.path}: device is being set up or "
                                      "used by another task", self.path)
            raise _os_error(err, f"{what} on {self.path}", self.path)
        return 0

    def configure(self, socket_fds, uint64_t size_bytes, *, uint64_t block_size=4096,
                  uint64_t flags=0, uint64_t timeout_s=0):
        """NBD_SET_SOCK for each socket (EBUSY when another task set this device up),
        then NBD_SET_BLKSIZE, NBD_SET_SIZE_BLOCKS, NBD_SET_TIMEOUT, NBD_SET_FLAGS."""
        for fd in socket_fds:
            self._ioctl(IOCTL_SET_SOCK, fd, "NBD_SET_SOCK")
        self._ioctl(IOCTL_SET_BLKSIZE, block_size, "NBD_SET_BLKSIZE")
        self._ioctl(IOCTL_SET_SIZE_BLOCKS, size_bytes // block_size, "NBD_SET_SIZE_BLOCKS")
        if timeout_s:
            self._ioctl(IOCTL_SET_TIMEOUT, timeout_s, "NBD_SET_TIMEOUT")
        self._ioctl(IOCTL_SET_FLAGS, flags, "NBD_SET_FLAGS")

    def run(self):
        """NBD_DO_IT: starts the device and blocks (GIL released) until it is
        disconnected. Returns normally after a requested disconnect."""
        self._ioctl(IOCTL_DO_IT, 0, "NBD_DO_IT")

    def disconnect(self):
        """NBD_DISCONNECT: ask the kernel to end the connection (DO_IT then returns)."""
        self._ioctl(IOCTL_DISCONNECT, 0, "NBD_DISCONNECT")

    def clear_sock(self):
        """NBD_CLEAR_SOCK: drop the kernel's sockets and configuration."""
        self._ioctl(IOCTL_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK")

    def close(self):
        if self.fd >= 0:
            c.close(self.fd)
            self.fd = -1
