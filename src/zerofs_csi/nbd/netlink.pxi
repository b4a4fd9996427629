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
