# ---------------------------------------------------------------------------------------
# Asking an NBD server without attaching anything: its greeting (is it there, which
# handshake flags) and its export list; both end the session with NBD_OPT_ABORT
# ---------------------------------------------------------------------------------------

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
