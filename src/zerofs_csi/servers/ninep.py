"""A small 9P2000.L client: just enough to manage NBD export files on a ZeroFS server.

ZeroFS serves each file of its ``.nbd/`` directory as an NBD export named after the
file, with the file's size as the device size. There is no CLI to create one, so the
node speaks 9P2000.L to the server's 9P unix socket: one connection, a handful of
round trips, no kernel 9P mount and no exec.

Wire format (diod ``protocol.md``; Plan 9 ``intro(5)``): every message is
``size[4] type[1] tag[2] body``, little endian, ``size`` counting itself. A string is
``length[2]`` followed by that many UTF-8 bytes; a qid is ``type[1] version[4]
path[8]``. Any request may be answered with ``Rlerror ecode[4]``, a Linux errno.

Every socket operation runs under the call's deadline; nothing blocks forever.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from zerofs_csi import errors

# Message types, from the Linux kernel's include/net/9p/9p.h (enum p9_msg_t).
TLERROR = 6  # never sent; listed to complete the table
RLERROR = 7
TLOPEN = 12
RLOPEN = 13
TLCREATE = 14
RLCREATE = 15
TGETATTR = 24
RGETATTR = 25
TSETATTR = 26
RSETATTR = 27
TMKDIR = 72
RMKDIR = 73
TVERSION = 100
RVERSION = 101
TATTACH = 104
RATTACH = 105
TWALK = 110
RWALK = 111
TCLUNK = 120
RCLUNK = 121

# include/net/9p/9p.h: P9_NOTAG, P9_NOFID; diod protocol.md for version strings.
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
VERSION_9P2000_L = "9P2000.L"

# Open flags of Tlopen/Tlcreate (include/net/9p/9p.h P9_DOTL_*, Linux x86 values).
DOTL_RDWR = 0o2
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200

# Tgetattr request mask and Tsetattr valid bits (include/net/9p/9p.h P9_STATS_*,
# P9_ATTR_*; diod protocol.md "getattr", "setattr").
GETATTR_MODE = 0x00000001
GETATTR_SIZE = 0x00000200
SETATTR_SIZE = 0x00000008

# Qid type bits (include/net/9p/9p.h enum p9_qid_t).
QTDIR = 0x80
QTSYMLINK = 0x02

HEADER = struct.Struct("<IBH")  # size[4] type[1] tag[2]
QID = struct.Struct("<BIQ")  # type[1] version[4] path[8]
# Rgetattr: valid[8] qid[13] mode[4] uid[4] gid[4] then 15 eight-byte fields from nlink
# to data_version (diod protocol.md "getattr").
RGETATTR_BODY = struct.Struct("<Q13sIII15Q")

# The largest message this client asks for; servers may lower it.
DEFAULT_MSIZE = 65536
# The Linux 9P client (net/9p/client.c, p9_client_version) refuses a server msize below
# 4096; every message this client sends or expects fits well inside it.
MIN_MSIZE = 4096
# NAME_MAX (include/uapi/linux/limits.h): the longest file name on Linux.
NAME_MAX = 255
# The directory of a ZeroFS filesystem whose files are the NBD exports.
EXPORT_DIRECTORY = ".nbd"
DEFAULT_TIMEOUT = 10.0
# The largest size a 9P2000.L size[8] and a Linux off_t can both hold.
MAX_EXPORT_SIZE = 2**63 - 1

_ROOT_FID = 0
_DIR_FID = 1
_FILE_FID = 2


@dataclass(frozen=True)
class Qid:
    """The server's identity of a file: its type bits, version and unique path."""

    type: int
    version: int
    path: int

    @property
    def is_dir(self) -> bool:
        return bool(self.type & QTDIR)

    @property
    def is_regular(self) -> bool:
        # 9P2000.L has no "regular file" bit: a plain file has none of dir/symlink set.
        return not self.type & (QTDIR | QTSYMLINK)


# ---------------------------------------------------------------------------------
# Encoding (pure functions, tested against golden bytes)


def _string(text: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError("a 9P string holds at most 65535 bytes")
    return struct.pack("<H", len(data)) + data


def encode_message(msg_type: int, tag: int, body: bytes) -> bytes:
    """``size[4] type[1] tag[2] body``."""
    return HEADER.pack(HEADER.size + len(body), msg_type, tag) + body


def tversion(msize: int, version: str = VERSION_9P2000_L) -> bytes:
    """``Tversion tag[2]=NOTAG msize[4] version[s]``."""
    return encode_message(TVERSION, NOTAG, struct.pack("<I", msize) + _string(version))


def tattach(tag: int, fid: int, uname: str, aname: str, n_uname: int) -> bytes:
    """``Tattach fid[4] afid[4]=NOFID uname[s] aname[s] n_uname[4]``."""
    body = struct.pack("<II", fid, NOFID) + _string(uname) + _string(aname)
    return encode_message(TATTACH, tag, body + struct.pack("<I", n_uname))


def twalk(tag: int, fid: int, newfid: int, names: tuple[str, ...]) -> bytes:
    """``Twalk fid[4] newfid[4] nwname[2] nwname*(wname[s])``."""
    body = struct.pack("<IIH", fid, newfid, len(names)) + b"".join(_string(n) for n in names)
    return encode_message(TWALK, tag, body)


def tlcreate(tag: int, fid: int, name: str, flags: int, mode: int, gid: int) -> bytes:
    """``Tlcreate fid[4] name[s] flags[4] mode[4] gid[4]``."""
    body = struct.pack("<I", fid) + _string(name) + struct.pack("<III", flags, mode, gid)
    return encode_message(TLCREATE, tag, body)


def tmkdir(tag: int, dfid: int, name: str, mode: int, gid: int) -> bytes:
    """``Tmkdir dfid[4] name[s] mode[4] gid[4]``."""
    body = struct.pack("<I", dfid) + _string(name) + struct.pack("<II", mode, gid)
    return encode_message(TMKDIR, tag, body)


def tgetattr(tag: int, fid: int, request_mask: int) -> bytes:
    """``Tgetattr fid[4] request_mask[8]``."""
    return encode_message(TGETATTR, tag, struct.pack("<IQ", fid, request_mask))


def tsetattr_size(tag: int, fid: int, size: int) -> bytes:
    """``Tsetattr fid[4] valid[4] mode[4] uid[4] gid[4] size[8] atime_sec[8]
    atime_nsec[8] mtime_sec[8] mtime_nsec[8]`` with only the size bit valid."""
    body = struct.pack("<IIIIIQQQQQ", fid, SETATTR_SIZE, 0, 0, 0, size, 0, 0, 0, 0)
    return encode_message(TSETATTR, tag, body)


def tclunk(tag: int, fid: int) -> bytes:
    """``Tclunk fid[4]``."""
    return encode_message(TCLUNK, tag, struct.pack("<I", fid))


def _protocol_error(detail: str) -> OSError:
    return OSError(errno.EPROTO, f"9P protocol violation: {detail}")


def decode_qid(data: bytes, offset: int = 0) -> Qid:
    if len(data) < offset + QID.size:
        raise _protocol_error("qid cut short")
    return Qid(*QID.unpack_from(data, offset))


def decode_rgetattr_size(body: bytes) -> tuple[Qid, int, int]:
    """(qid, mode, size) from an Rgetattr body; EPROTO unless size is marked valid."""
    if len(body) != RGETATTR_BODY.size:
        raise _protocol_error(f"Rgetattr body of {len(body)} bytes, not {RGETATTR_BODY.size}")
    valid, qid_bytes, mode, _uid, _gid, *rest = RGETATTR_BODY.unpack(body)
    if not valid & GETATTR_SIZE:
        raise _protocol_error("Rgetattr without a valid size")
    # rest: nlink, rdev, size, blksize, blocks, times..., gen, data_version
    return decode_qid(qid_bytes), mode, rest[2]


# ---------------------------------------------------------------------------------
# Connection


def validate_export_name(name: str) -> str:
    """An export name is one file name inside ``.nbd/``: no '/', not '.' or '..'."""
    if not isinstance(name, str) or not name:
        raise errors.InvalidArgument("export name is required")
    encoded = name.encode("utf-8", errors="surrogateescape")
    if len(encoded) > NAME_MAX:
        raise errors.InvalidArgument(
            f"export name is {len(encoded)} bytes long; a file name holds at most {NAME_MAX}"
        )
    if "/" in name or "\x00" in name or name in (".", ".."):
        raise errors.InvalidArgument(
            f"export name {name[:80]!r} is not a single file name (no '/', NUL, '.' or '..')"
        )
    return name


class NinePConnection:
    """One 9P2000.L session on a unix socket. Not thread-safe; one call at a time.

    Every method blocks for at most the time left until ``deadline`` (a
    ``time.monotonic()`` value) and raises DeadlineExceeded after it. Server errors
    are OSError with the server's errno and ``path`` (for messages) as filename.
    """

    def __init__(self, socket_path: Path | str, *, label: str, deadline: float) -> None:
        self.socket_path = str(socket_path)
        self.label = label
        self.deadline = deadline
        self.msize = DEFAULT_MSIZE
        self._tag = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(self._remaining())
            self._sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
            self._sock.close()
            raise self._unavailable(exc.strerror or str(exc)) from None
        except TimeoutError:
            self._sock.close()
            raise self._deadline_exceeded() from None
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> NinePConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- transport

    def _unavailable(self, reason: str) -> errors.Unavailable:
        return errors.Unavailable(
            f"volume server for {self.label} is not answering on {self.socket_path}: {reason}"
        )

    def _deadline_exceeded(self) -> errors.DeadlineExceeded:
        return errors.DeadlineExceeded(
            f"volume server for {self.label} did not answer on {self.socket_path} in time"
        )

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._deadline_exceeded()
        return left

    def _send(self, data: bytes) -> None:
        try:
            self._sock.settimeout(self._remaining())
            self._sock.sendall(data)
        except TimeoutError:
            raise self._deadline_exceeded() from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._unavailable(f"connection lost ({exc.strerror})") from None

    def _recv_exact(self, count: int) -> bytes:
        chunks = []
        while count:
            try:
                self._sock.settimeout(self._remaining())
                chunk = self._sock.recv(min(count, 1 << 16))
            except TimeoutError:
                raise self._deadline_exceeded() from None
            except ConnectionResetError as exc:
                raise self._unavailable(f"connection lost ({exc.strerror})") from None
            if not chunk:
                raise self._unavailable("the server closed the connection")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def _next_tag(self) -> int:
        # Tags 1..0xFFFE; NOTAG is reserved for Tversion.
        self._tag = self._tag % 0xFFFE + 1
        return self._tag

    def _receive(self, tag: int, expected: int, what: str, path: str) -> bytes:
        size, msg_type, got_tag = HEADER.unpack(self._recv_exact(HEADER.size))
        if not HEADER.size <= size <= self.msize:
            raise _protocol_error(f"reply of {size} bytes to {what} (msize {self.msize})")
        body = self._recv_exact(size - HEADER.size)
        if got_tag != tag:
            raise _protocol_error(f"reply to {what} has tag {got_tag}, expected {tag}")
        if msg_type == RLERROR:
            if len(body) != 4:
                raise _protocol_error(f"Rlerror of {len(body)} bytes")
            (ecode,) = struct.unpack("<I", body)
            if ecode == 0:
                raise _protocol_error(f"Rlerror without an errno for {what}")
            raise OSError(ecode, f"{os.strerror(ecode)} ({what} over 9P)", path)
        if msg_type != expected:
            raise _protocol_error(f"message type {msg_type} in reply to {what}")
        return body

    def _call(self, build: bytes, tag: int, expected: int, what: str, path: str) -> bytes:
        self._send(build)
        return self._receive(tag, expected, what, path)

    # -- messages

    def version(self, msize: int = DEFAULT_MSIZE) -> int:
        """Negotiate 9P2000.L and the message size; returns the agreed msize."""
        self.msize = msize
        body = self._call(tversion(msize), NOTAG, RVERSION, "Tversion", "")
        if len(body) < 6:
            raise _protocol_error("Rversion cut short")
        (server_msize, length) = struct.unpack_from("<IH", body)
        version = body[6 : 6 + length].decode("utf-8", errors="replace")
        if len(body) != 6 + length:
            raise _protocol_error("Rversion has trailing bytes or a cut-short version")
        if version != VERSION_9P2000_L:
            raise _protocol_error(f"server does not speak 9P2000.L (it answered {version!r})")
        if not MIN_MSIZE <= server_msize <= msize:
            raise _protocol_error(f"server msize {server_msize} outside {MIN_MSIZE}..{msize}")
        self.msize = server_msize
        return server_msize

    def attach(self, fid: int, *, uname: str = "root", aname: str = "", n_uname: int = 0) -> Qid:
        """Attach ``fid`` to the filesystem root. ZeroFS ignores ``aname``; uid 0 owns
        what is created so the NBD server can always open it."""
        tag = self._next_tag()
        body = self._call(tattach(tag, fid, uname, aname, n_uname), tag, RATTACH, "Tattach", "/")
        if len(body) != QID.size:
            raise _protocol_error("Rattach is not one qid")
        return decode_qid(body)

    def walk(self, fid: int, newfid: int, names: tuple[str, ...], path: str) -> list[Qid]:
        """Walk from ``fid``; returns one qid per element walked. Fewer qids than names
        means the walk stopped early and ``newfid`` was not created (9P walk(5))."""
        tag = self._next_tag()
        body = self._call(twalk(tag, fid, newfid, names), tag, RWALK, "Twalk", path)
        if len(body) < 2:
            raise _protocol_error("Rwalk cut short")
        (count,) = struct.unpack_from("<H", body)
        if count > len(names) or len(body) != 2 + count * QID.size:
            raise _protocol_error(f"Rwalk with {count} qids for {len(names)} names")
        return [decode_qid(body, 2 + i * QID.size) for i in range(count)]

    def walk_one(self, fid: int, newfid: int, name: str, path: str) -> Qid | None:
        """Walk one element; None when it does not exist (ENOENT)."""
        try:
            qids = self.walk(fid, newfid, (name,), path)
        except FileNotFoundError:
            return None
        if len(qids) != 1:
            # walk(5): failing on the first element must be an error, not nwqid=0.
            raise _protocol_error("Rwalk without a qid for a one-element walk")
        return qids[0]

    def mkdir(self, dfid: int, name: str, mode: int, gid: int, path: str) -> Qid:
        tag = self._next_tag()
        body = self._call(tmkdir(tag, dfid, name, mode, gid), tag, RMKDIR, "Tmkdir", path)
        if len(body) != QID.size:
            raise _protocol_error("Rmkdir is not one qid")
        return decode_qid(body)

    def lcreate(self, fid: int, name: str, flags: int, mode: int, gid: int, path: str) -> Qid:
        """Create ``name`` in directory ``fid``; afterwards ``fid`` is the open file."""
        tag = self._next_tag()
        message = tlcreate(tag, fid, name, flags, mode, gid)
        body = self._call(message, tag, RLCREATE, "Tlcreate", path)
        if len(body) != QID.size + 4:
            raise _protocol_error("Rlcreate is not qid[13] iounit[4]")
        return decode_qid(body)

    def getattr_size(self, fid: int, path: str) -> tuple[Qid, int]:
        tag = self._next_tag()
        mask = GETATTR_MODE | GETATTR_SIZE
        body = self._call(tgetattr(tag, fid, mask), tag, RGETATTR, "Tgetattr", path)
        qid, _mode, size = decode_rgetattr_size(body)
        return qid, size

    def setattr_size(self, fid: int, size: int, path: str) -> None:
        tag = self._next_tag()
        body = self._call(tsetattr_size(tag, fid, size), tag, RSETATTR, "Tsetattr", path)
        if body:
            raise _protocol_error("Rsetattr with a body")

    def clunk_all(self, fids: list[int]) -> None:
        """Clunk several fids in one round trip (independent requests may be
        outstanding together under distinct tags)."""
        tags = [self._next_tag() for _ in fids]
        self._send(b"".join(tclunk(tag, fid) for tag, fid in zip(tags, fids, strict=True)))
        pending = set(tags)
        while pending:
            size, msg_type, tag = HEADER.unpack(self._recv_exact(HEADER.size))
            if not HEADER.size <= size <= self.msize or tag not in pending:
                raise _protocol_error(f"unexpected reply (type {msg_type}, tag {tag}) to Tclunk")
            self._recv_exact(size - HEADER.size)
            # A failed clunk still frees the fid (clunk(5)); only the framing matters.
            if msg_type not in (RCLUNK, RLERROR):
                raise _protocol_error(f"message type {msg_type} in reply to Tclunk")
            pending.remove(tag)


# ---------------------------------------------------------------------------------
# What the node needs


def _validate_size(size_bytes: int) -> int:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise errors.InvalidArgument("export size must be an integer number of bytes")
    if not 0 < size_bytes <= MAX_EXPORT_SIZE:
        raise errors.InvalidArgument(
            f"export size {size_bytes} is outside 1..{MAX_EXPORT_SIZE} bytes"
        )
    return size_bytes


def _open_session(
    socket_path: Path | str, name: str, timeout: float, aname: str
) -> NinePConnection:
    connection = NinePConnection(socket_path, label=name, deadline=time.monotonic() + timeout)
    try:
        connection.version()
        connection.attach(_ROOT_FID, aname=aname)
    except BaseException:
        connection.close()
        raise
    return connection


def _check_regular(qid: Qid, path: str) -> None:
    if not qid.is_regular:
        code = errno.EISDIR if qid.is_dir else errno.EINVAL
        raise OSError(code, f"{os.strerror(code)} (the export must be a regular file)", path)


@dataclass(frozen=True)
class ExportFile:
    size_bytes: int
    created: bool  # by this call: the file is new, sparse and reads as zeroes


def prepare_export(
    socket_path: Path | str,
    name: str,
    size_bytes: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    aname: str = "",
) -> ExportFile:
    """Make sure ``.nbd/<name>`` exists with at least ``size_bytes``; say its size and
    whether this call created it.

    Creates ``.nbd`` and the file when missing and grows a smaller file. Never shrinks:
    a larger file keeps its size, which is returned so the caller can decide. Blocks for
    at most ``timeout`` seconds in total. ``aname`` selects the tree on servers that
    export several (diod wants the exported path); ZeroFS ignores it.

    Raises InvalidArgument for a bad name or size, Unavailable when nothing answers on
    the socket, DeadlineExceeded on timeout, OSError with the server's errno (EPROTO
    for protocol violations).
    """
    validate_export_name(name)
    _validate_size(size_bytes)
    path = f"{EXPORT_DIRECTORY}/{name}"
    with _open_session(socket_path, name, timeout, aname) as conn:
        fids = [_ROOT_FID]
        directory = conn.walk_one(_ROOT_FID, _DIR_FID, EXPORT_DIRECTORY, EXPORT_DIRECTORY)
        if directory is None:
            # FileExistsError: created by someone else since our walk.
            with contextlib.suppress(FileExistsError):
                conn.mkdir(_ROOT_FID, EXPORT_DIRECTORY, 0o755, 0, EXPORT_DIRECTORY)
            directory = conn.walk_one(_ROOT_FID, _DIR_FID, EXPORT_DIRECTORY, EXPORT_DIRECTORY)
            if directory is None:
                raise OSError(errno.ENOENT, "created but not found", EXPORT_DIRECTORY)
        fids.append(_DIR_FID)
        if not directory.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), EXPORT_DIRECTORY)

        file_fid = _FILE_FID
        existing = conn.walk_one(_DIR_FID, _FILE_FID, name, path)
        if existing is None:
            flags = DOTL_RDWR | DOTL_CREATE | DOTL_EXCL
            try:
                # On success _DIR_FID becomes the new, open file.
                conn.lcreate(_DIR_FID, name, flags, 0o600, 0, path)
                file_fid = _DIR_FID
            except FileExistsError:
                existing = conn.walk_one(_DIR_FID, _FILE_FID, name, path)
                if existing is None:
                    raise OSError(errno.ENOENT, "exists but cannot be walked to", path) from None
        if existing is not None:
            fids.append(_FILE_FID)
            _check_regular(existing, path)

        if file_fid == _DIR_FID:
            size = 0  # just created, empty
        else:
            qid, size = conn.getattr_size(file_fid, path)
            _check_regular(qid, path)
        if size < size_bytes:
            conn.setattr_size(file_fid, size_bytes, path)
            _, size = conn.getattr_size(file_fid, path)
            if size < size_bytes:
                raise OSError(errno.EIO, f"size is {size} after setting {size_bytes}", path)
        conn.clunk_all(fids)
        return ExportFile(size, created=file_fid == _DIR_FID)


def export_size(
    socket_path: Path | str, name: str, *, timeout: float = DEFAULT_TIMEOUT, aname: str = ""
) -> int | None:
    """The size of ``.nbd/<name>`` in bytes, or None when it does not exist.

    Same errors as ``prepare_export``.
    """
    validate_export_name(name)
    path = f"{EXPORT_DIRECTORY}/{name}"
    with _open_session(socket_path, name, timeout, aname) as conn:
        try:
            qids = conn.walk(_ROOT_FID, _FILE_FID, (EXPORT_DIRECTORY, name), path)
        except FileNotFoundError:
            qids = []
        if len(qids) < 2:
            # Missing. A walk that stopped early created no fid (walk(5)); clunking
            # _FILE_FID anyway is harmless (an Rlerror) and frees it on a server that did.
            conn.clunk_all([_ROOT_FID, _FILE_FID])
            return None
        qid, size = conn.getattr_size(_FILE_FID, path)
        _check_regular(qid, path)
        conn.clunk_all([_ROOT_FID, _FILE_FID])
        return size
