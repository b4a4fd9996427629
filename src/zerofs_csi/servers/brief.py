"""A short-lived ZeroFS server for one volume, for what needs the server of a volume that
is staged nowhere (a checkpoint, deleting one): started, used through its admin service,
stopped.

It runs ``COMMAND run -c CONFIG`` with the volume's config rendered as for a staged
server, its sockets, cache, config and log in a private directory of its own (0700)
that goes when it stops; the secrets reach it through its environment only, as with the
local backend's servers. It is one more writer of the volume's storage while it runs:
the caller makes sure no other server of the volume runs (``LocalCheckpoints``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from zerofs_csi import errors
from zerofs_csi.host.unix_socket import accepts
from zerofs_csi.observability.sanitize import MASK, REDACTOR
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 10
# Variables of the plugin's environment a server may need; nothing else is passed on.
INHERITED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


@dataclass(frozen=True)
class BriefServer:
    admin: AdminClient
    nbd: Path  # its NBD socket
    ninep: Path  # its 9P socket


@contextlib.contextmanager
def brief_server(
    command: Sequence[str],
    directory: Path,
    volume_id: str,
    settings: VolumeSettings,
    secrets: VolumeSecrets,
    run_args: Sequence[str] = (),
) -> Iterator[BriefServer]:
    """The volume's server, running in ``directory`` (created, and removed afterwards),
    until the block ends; yields it once its admin service answers and its NBD socket
    accepts. ``run_args`` follow ``run -c CONFIG`` (``--checkpoint NAME`` serves a
    checkpoint, read-only).

    Raises FailedPrecondition when the command cannot be run, Unavailable when the
    server exits while starting, DeadlineExceeded when it does not answer within the
    settings' ready timeout (both with the last lines of its log).
    """
    shutil.rmtree(directory, ignore_errors=True)  # a leftover of a killed controller
    directory.mkdir(parents=True, mode=0o700)
    # Laid out as a volume's socket directory (ServerSockets), admin service included.
    sockets = ServerSockets.under(directory.parent, directory.name)
    admin_socket, nbd_socket, ninep_socket = sockets.admin, sockets.nbd, sockets.ninep
    rendered = render_zerofs_config(
        settings,
        volume_id,
        secrets,
        cache_dir=str(directory / "cache"),
        nbd_socket=str(nbd_socket),
        ninep_socket=str(ninep_socket),
        rpc_socket=str(admin_socket),
    )
    secret_env = dict(rendered.secret_env)
    REDACTOR.remember(list(secret_env.values()))
    config = directory / "config.toml"
    config.write_text(rendered.toml_text)
    config.chmod(0o600)
    environment = {k: os.environ[k] for k in INHERITED_ENVIRONMENT if k in os.environ}
    environment["RUST_LOG"] = settings.rust_log
    log_path = directory / "server.log"
    try:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*command, "run", "-c", str(config), *run_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**environment, **secret_env},
                cwd=directory,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise errors.FailedPrecondition(
            f"cannot run the ZeroFS command {command[0]!r}: {exc.strerror}; install zerofs "
            "or point --zerofs-command at it"
        ) from None
    client = AdminClient(admin_socket, f"short-lived server of volume {volume_id}")
    try:
        deadline = time.monotonic() + settings.pod_ready_timeout_seconds
        while not (accepts(nbd_socket) and client.answers(timeout=2.0)):
            if process.poll() is not None:
                raise errors.Unavailable(
                    f"the short-lived server of volume {volume_id} exited with status "
                    f"{process.returncode} while starting" + _log_tail(log_path, secret_env)
                )
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(
                    f"the short-lived server of volume {volume_id} did not answer on "
                    f"{admin_socket} within {settings.pod_ready_timeout_seconds}s"
                    + _log_tail(log_path, secret_env)
                )
            time.sleep(0.05)
        yield BriefServer(client, nbd_socket, ninep_socket)
    finally:
        client.close()
        _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (ZeroFS flushes and closes), then SIGKILL of its group after the timeout;
    what is left of its group goes too."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _log_tail(path: Path, secret_env: dict[str, str]) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return ""
    for value in sorted(secret_env.values(), key=len, reverse=True):
        if value:
            text = text.replace(value, MASK)
    lines = REDACTOR.redact(text).splitlines()[-LOG_TAIL_LINES:]
    return "; its last lines:\n" + "\n".join(lines)
