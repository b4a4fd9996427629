# ---------------------------------------------------------------------------------------
# NBD client handshake: option negotiation (fixed newstyle, GO with EXPORT_NAME fallback),
# pipelined over several sockets, GIL released; its result, Negotiated
# ---------------------------------------------------------------------------------------

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
