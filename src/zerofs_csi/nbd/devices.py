"""What the attach path hands out: a connected device, what sysfs says of one, and the
whole-disk lock that keeps udev's probe waiting."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class DiskLock:
    """An open read-only descriptor of the whole disk holding LOCK_EX: udev postpones its
    probe until it is released. Hold it across mkfs and mount, and across a DISCONNECT.
    Made with None, it holds nothing."""

    def __init__(self, fd: int | None) -> None:
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DiskLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@dataclass(frozen=True)
class Device:
    """A connected NBD device serving ``backend_id``."""

    index: int
    path: str
    size_bytes: int
    backend_id: str
    lock: DiskLock | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DeviceInfo:
    """What sysfs says about a configured NBD device."""

    index: int
    backend_id: str | None
    size_bytes: int
    pid: int | None
