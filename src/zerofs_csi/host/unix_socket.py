"""Whether a server listens on a unix socket."""

from __future__ import annotations

import socket
from pathlib import Path


def accepts(path: Path) -> bool:
    """Whether something listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
