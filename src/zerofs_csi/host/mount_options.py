"""Mount option words as mount(2) takes them: VFS flags, and the rest as filesystem data.

Kept apart from the calls in ``mounts``, so that checking a volume capability's options
loads no ctypes binding of libc.
"""

from __future__ import annotations

from dataclasses import dataclass

# From include/uapi/linux/mount.h.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# Option words that are VFS flags: name -> (flag, set it?). Everything else goes to the
# filesystem as mount data.
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "defaults": (0, True),
}
# Options a user may not pass through a StorageClass: they would change what we mount.
FORBIDDEN_OPTIONS = frozenset({"bind", "rbind", "remount", "move", "loop"})


@dataclass(frozen=True)
class MountOptions:
    flags: int
    data: str

    @classmethod
    def parse(cls, options: list[str] | tuple[str, ...]) -> MountOptions:
        """Split option words (each may hold commas) into flags and filesystem data.

        Raises ValueError for an option that must not be passed.
        """
        flags = 0
        data: list[str] = []
        for word in (w.strip() for opt in options for w in opt.split(",")):
            if not word:
                continue
            if word in FORBIDDEN_OPTIONS:
                raise ValueError(f"mount option {word!r} is not allowed")
            if word in _FLAG_OPTIONS:
                flag, on = _FLAG_OPTIONS[word]
                flags = flags | flag if on else flags & ~flag
            else:
                data.append(word)
        return cls(flags, ",".join(data))
