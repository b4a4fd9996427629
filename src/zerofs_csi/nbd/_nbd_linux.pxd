# C declarations used by _nbd.pyx: sockets, netlink, block ioctls, inotify, flock.
# Only what the attach path calls is declared; numbers come from the system headers.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef unsigned int mode_t
    ctypedef unsigned long dev_t


cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR, EAGAIN, EWOULDBLOCK, ENOENT, EPERM, EACCES, EBUSY, EINVAL, EPROTO
    int ETIMEDOUT, ECONNRESET, EOPNOTSUPP, EMSGSIZE, ENOBUFS, ENODEV, ENXIO, EEXIST
    int EBADMSG, ENOSPC, ECONNREFUSED, EIO


cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    void *memset(void *s, int c, size_t n)
    int memcmp(const void *a, const void *b, size_t n)
    size_t strlen(const char *s)
    char *strerror(int errnum)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)


cdef extern from "<fcntl.h>" nogil:
    int O_RDONLY, O_RDWR, O_CLOEXEC, O_NONBLOCK
    int open(const char *path, int flags, ...)


cdef extern from "<sys/stat.h>" nogil:
    int S_IFBLK
    int mknod(const char *path, mode_t mode, dev_t dev)


cdef extern from "<sys/sysmacros.h>" nogil:
    dev_t makedev(unsigned int major, unsigned int minor)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<sys/file.h>" nogil:
    int LOCK_EX, LOCK_NB, LOCK_UN
    int flock(int fd, int operation)


cdef extern from "<poll.h>" nogil:
    ctypedef unsigned long nfds_t
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN, POLLOUT, POLLERR, POLLHUP
    int poll(pollfd *fds, nfds_t nfds, int timeout)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)


cdef extern from "<sys/time.h>" nogil:
    ctypedef long suseconds_t
    struct timeval:
        time_t tv_sec
        suseconds_t tv_usec


cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t x)
    uint32_t htobe32(uint32_t x)
    uint64_t htobe64(uint64_t x)
    uint16_t be16toh(uint16_t x)
    uint32_t be32toh(uint32_t x)
    uint64_t be64toh(uint64_t x)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    int AF_NETLINK, AF_UNIX, AF_UNSPEC
    int SOCK_RAW, SOCK_DGRAM, SOCK_STREAM, SOCK_CLOEXEC, SOCK_NONBLOCK
    int SOL_SOCKET, SO_RCVTIMEO, SO_SNDTIMEO, SO_RCVBUF
    int SOL_NETLINK
    int MSG_NOSIGNAL, MSG_DONTWAIT
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)


cdef extern from "<sys/un.h>" nogil:
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]


cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP


cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY


cdef extern from "<netdb.h>" nogil:
    struct addrinfo:
        int ai_flags
        int ai_family
        int ai_socktype
        int ai_protocol
        socklen_t ai_addrlen
        sockaddr *ai_addr
        addrinfo *ai_next
    int getaddrinfo(const char *node, const char *service, const addrinfo *hints,
                    addrinfo **res)
    void freeaddrinfo(addrinfo *res)
    const char *gai_strerror(int errcode)


cdef extern from "<sys/inotify.h>" nogil:
    struct inotify_event:
        int wd
        uint32_t mask
        uint32_t cookie
        uint32_t len
    int IN_CLOEXEC, IN_NONBLOCK
    uint32_t IN_CLOSE_NOWRITE, IN_CLOSE_WRITE
    int inotify_init1(int flags)
    int inotify_add_watch(int fd, const char *path, uint32_t mask)


cdef extern from "<linux/netlink.h>" nogil:
    struct sockaddr_nl:
        sa_family_t nl_family
        unsigned short nl_pad
        uint32_t nl_pid
        uint32_t nl_groups
    struct nlmsghdr:
        uint32_t nlmsg_len
        uint16_t nlmsg_type
        uint16_t nlmsg_flags
        uint32_t nlmsg_seq
        uint32_t nlmsg_pid
    struct nlattr:
        uint16_t nla_len
        uint16_t nla_type
    int NETLINK_GENERIC, NETLINK_KOBJECT_UEVENT
    int NETLINK_ADD_MEMBERSHIP, NETLINK_CAP_ACK, NETLINK_EXT_ACK
    int NLM_F_REQUEST, NLM_F_ACK, NLM_F_MULTI, NLM_F_CAPPED, NLM_F_ACK_TLVS
    int NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN
    int NLMSGERR_ATTR_MSG, NLMSGERR_ATTR_OFFS
    int NLA_F_NESTED, NLA_TYPE_MASK


cdef extern from "<linux/genetlink.h>" nogil:
    struct genlmsghdr:
        uint8_t cmd
        uint8_t version
        uint16_t reserved
    int GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_CMD_NEWFAMILY
    int CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS
    int CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID


cdef extern from "<linux/nbd.h>" nogil:
    unsigned long NBD_SET_SOCK, NBD_SET_BLKSIZE, NBD_SET_SIZE, NBD_DO_IT, NBD_CLEAR_SOCK
    unsigned long NBD_SET_SIZE_BLOCKS, NBD_DISCONNECT, NBD_SET_TIMEOUT, NBD_SET_FLAGS
    int NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA
    int NBD_FLAG_SEND_TRIM, NBD_FLAG_CAN_MULTI_CONN
    int NBD_CFLAG_DESTROY_ON_DISCONNECT, NBD_CFLAG_DISCONNECT_ON_CLOSE


cdef extern from "<linux/nbd-netlink.h>" nogil:
    int NBD_GENL_VERSION
    int NBD_ATTR_INDEX, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_ATTR_TIMEOUT
    int NBD_ATTR_SERVER_FLAGS, NBD_ATTR_CLIENT_FLAGS, NBD_ATTR_SOCKETS
    int NBD_ATTR_DEAD_CONN_TIMEOUT, NBD_ATTR_DEVICE_LIST, NBD_ATTR_BACKEND_IDENTIFIER
    int NBD_SOCK_ITEM, NBD_SOCK_FD, NBD_DEVICE_ITEM, NBD_DEVICE_INDEX, NBD_DEVICE_CONNECTED
    int NBD_CMD_CONNECT, NBD_CMD_DISCONNECT, NBD_CMD_RECONFIGURE, NBD_CMD_LINK_DEAD
    int NBD_CMD_STATUS


cdef extern from "<linux/fs.h>" nogil:
    unsigned long BLKGETSIZE64


# A compile-time equality check: the build fails when a number in the module's explicit
# table differs from the system header it cites.
cdef extern from *:
    """
    #define ZCSI_SAME_AS_HEADER(ours, header) \\
        ((long)sizeof(char[((long)(ours) == (long)(header)) ? 1 : -1]))
    """
    long SAME_AS_HEADER "ZCSI_SAME_AS_HEADER"(long ours, long header) nogil
