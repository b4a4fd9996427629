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
