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
