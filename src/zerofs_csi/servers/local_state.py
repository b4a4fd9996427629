"""What the local process backend keeps of each volume's server under
``<state_dir>/servers/<volume>/`` (see ``local``): the paths, the state file that lets a
restarted plugin adopt a running server, and owner-only atomic writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class ServerPaths:
    """The files of one volume's server under ``<state_dir>/servers/<volume>``."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "config.toml"

    @property
    def secrets(self) -> Path:
        return self.directory / "secrets.json"

    @property
    def state(self) -> Path:
        return self.directory / "server.json"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def cache(self) -> Path:
        return self.directory / "cache"


@dataclass
class LocalServer:
    """What the backend knows of one volume's server process."""

    volume_id: str
    argv: list[str]
    config_hash: str
    environment: dict[str, str]  # non-secret variables; secrets come from secrets.json
    pid: int = 0
    start_time: int = 0
    boot_id: str = ""
    restarts: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float = 0.0  # time.monotonic() of the spawn
    failures: int = 0  # deaths since the server last stayed up STABLE_AFTER seconds
    restart_at: float | None = None  # when the supervisor restarts a dead server
    answered_at: float = 0.0  # time.monotonic() of the last handshake it answered
    # Its process greeted once, so bound its NBD socket (kept in the state: an instance
    # that adopts the server knows it too).
    answered: bool = False
    probe_at: float = 0.0  # when the supervisor probes it next
    log_offset: int = 0  # where this process's output starts in server.log
    # It exited fenced by a newer writer of the volume: not restarted (see ``local``).
    fenced: bool = False


def read_log(path: Path, since: int = 0, at_most: int | None = None) -> str | None:
    """The text of a log from byte ``since`` (from its start when the file is shorter
    than that: rotated since), only its last ``at_most`` bytes when given; None when it
    cannot be read."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = since if since <= size else 0
            if at_most is not None:
                start = max(start, size - at_most)
            f.seek(start)
            return f.read().decode(errors="replace")
    except OSError:
        return None


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def remove_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket (a dead server's, which would make bind() fail)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def stored_secrets(paths: ServerPaths) -> dict[str, str] | None:
    """The variables ``secrets.json`` gives the server, or None when unreadable."""
    try:
        data = json.loads(paths.secrets.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_state(paths: ServerPaths, server: LocalServer) -> None:
    state = {
        "version": STATE_VERSION,
        "volume_id": server.volume_id,
        "pid": server.pid,
        "start_time": server.start_time,
        "boot_id": server.boot_id,
        "config_hash": server.config_hash,
        "argv": server.argv,
        "environment": server.environment,
        "restarts": server.restarts,
        "answered": server.answered,
        "log_offset": server.log_offset,
        "fenced": server.fenced,
    }
    write_private(paths.state, json.dumps(state).encode())


def load_state(paths: ServerPaths, volume_id: str) -> LocalServer | None:
    try:
        state = json.loads(paths.state.read_bytes())
        if state.get("version") != STATE_VERSION or state.get("volume_id") != volume_id:
            raise ValueError("unknown state version or another volume's state")
        return LocalServer(
            volume_id=volume_id,
            argv=[str(a) for a in state["argv"]],
            config_hash=str(state["config_hash"]),
            environment={str(k): str(v) for k, v in state["environment"].items()},
            pid=int(state["pid"]),
            start_time=int(state["start_time"]),
            boot_id=str(state["boot_id"]),
            restarts=int(state["restarts"]),
            answered=bool(state.get("answered", False)),
            log_offset=int(state.get("log_offset", 0)),
            fenced=bool(state.get("fenced", False)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning(
            "unreadable volume server state ignored",
            extra={"volume_id": volume_id, "error": str(exc)},
        )
        return None
