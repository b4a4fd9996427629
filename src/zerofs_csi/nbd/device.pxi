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


def lock_disk(int index, double timeout_s=10.0, str dev_dir="/dev"):
    """Open ``/dev/nbd<index>`` read-only and take LOCK_EX on it, waiting while udev's
    probe holds its shared lock; returns the descriptor. Held across a DISCONNECT, it
    keeps udev's probe of the last close off a device whose connections are going: the
    probe runs once it is closed, when the kernel has cleared the capacity. Opening does
    no I/O, so a hung server does not block it. Blocks with the GIL released, at most
    ``timeout_s``. Raises DeviceNotReady (ETIMEDOUT) or NbdError with open's errno."""
    cdef bytes path_b = _os.fsencode(f"{dev_dir}/nbd{index}")
    cdef const char *path = path_b
    cdef double deadline = _now() + timeout_s
    cdef int fd = -1, err = 0, rc = 0
    with nogil:
        fd = c.open(path, c.O_RDONLY | c.O_CLOEXEC | c.O_NONBLOCK)
        if fd < 0:
            err = c.errno
        else:
            rc = _wait_unlocked(fd, path, deadline)
            if rc == 1:
                err = c.ETIMEDOUT
            elif rc < 0:
                err = -rc
            if err:
                c.close(fd)
    if err == c.ETIMEDOUT:
        raise DeviceNotReady(err, f"{path_b.decode()}: udev still probes it after "
                                  f"{timeout_s} s", path_b.decode())
    if err:
        raise _os_error(err, f"{path_b.decode()} cannot be locked", path_b.decode())
    return fd


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
