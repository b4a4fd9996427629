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


def greet(address, double timeout_s=10.0):
    """Whether an NBD server is there: reads its newstyle greeting and ends the session at
    once with NBD_OPT_ABORT, so the server has nothing to complain about. Returns the
    server's handshake flags. Blocks with the GIL released, all of it bounded by
    ``timeout_s``; errors as for :func:`negotiate`."""
    cdef HsConn *h
    cdef HsError e
    cdef bytes path_b = b""
    cdef bytes host_b = b""
    cdef bytes port_b = b""
    cdef bint is_tcp = isinstance(address, tuple)
    cdef unsigned char msg[4 + 16]
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
    if h == NULL:
        raise MemoryError()
    c.memset(h, 0, sizeof(HsConn) - HS_BUFFER)
    c.memset(&e, 0, sizeof(e))
    h.deadline = deadline
    try:
        with nogil:
            if is_tcp:
                h.fd = _open_tcp(chost, cport, deadline, &e)
            else:
                h.fd = _open_unix(cpath, deadline, &e)
            if h.fd < 0 or _hs_greeting(h, &e) < 0:
                rc = -1
            else:
                n = _put_be32(msg, h.handshake_flags & (HS_FLAG_FIXED_NEWSTYLE
                                                        | HS_FLAG_NO_ZEROES))
                n += _option_header(msg + n, OPT_ABORT, 0)
                # The server may close first; the greeting already said what we asked.
                _hs_send(h, msg, n, &e)
        if rc < 0:
            raise _handshake_exception(&e, address, "")
        return h.handshake_flags
    finally:
        if h.fd >= 0:
            c.close(h.fd)
        free(h)
