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
