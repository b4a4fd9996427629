"""Freezing a mounted filesystem: FIFREEZE and FITHAW (ioctl_fifreeze(2)).

FIFREEZE writes the filesystem's dirty data and metadata to its device, makes what is on
the device a consistent filesystem (ext4 flushes its journal and clears the recovery
flag) and blocks every new write until FITHAW. Both need CAP_SYS_ADMIN. A filesystem
that cannot be frozen fails with EOPNOTSUPP; one frozen already with EBUSY.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

# include/uapi/linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


@contextlib.contextmanager
def frozen(mountpoint: str) -> Iterator[None]:
    """The filesystem mounted at ``mountpoint`` frozen while the block runs, thawed after
    (also when the block fails). Blocks while the filesystem writes back; raises OSError
    when it cannot be frozen."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        try:
            yield
        finally:
            fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)
