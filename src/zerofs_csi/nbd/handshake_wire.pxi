# ---------------------------------------------------------------------------------------
# NBD handshake transport: one connection's state and buffer, reads and writes bounded by
# the handshake's deadline, big-endian fields, opening the socket, and what a failure
# becomes in Python. GIL released in all but the deadline check and the exception.
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
