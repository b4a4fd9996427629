"""Local process backend: each volume's ZeroFS server is a child process of the plugin.

For tests and for hosts without Kubernetes. The server runs ``COMMAND run -c CONFIG``
(``zerofs``, or the stand-in ``tools/zerofs-standin``) in its own session, so it
survives a kill -9 of the node plugin. Everything needed to find, adopt, restart and
stop it lives under ``<state_dir>/servers/<volume>/``, and its sockets (NBD, 9P, and
ZeroFS's admin service, through which the controller checkpoints a staged volume) under
``<socket_root>/<volume>/``:

- ``config.toml``: the rendered ZeroFS config (0600). It holds only ``${VAR}``
  placeholders for secrets (see zerofs_config).
- ``secrets.json``: the values of those variables (0600, in a 0700 directory), the
  local counterpart of the Kubernetes backend's Secret. The server gets them in its
  environment, which is where ZeroFS reads ``${VAR}`` from; they are never on a
  command line, in the config file, in a log or in an error message.
- ``server.json``: pid, the process start time (field 22 of /proc/PID/stat) and boot
  id, so a reused pid is never mistaken for the server, plus the config hash and the
  restart count.
- ``server.log``: the server's stdout and stderr (rotated once at 1 MiB).
- ``cache/``: ZeroFS's disk cache.

A supervisor thread restarts a server that dies, with exponential backoff bounded by
``restart_backoff``; a server that stayed up for ``STABLE_AFTER`` seconds starts again
from the shortest delay. It also probes each running server every ``PROBE_EVERY_S``
with an NBD handshake bounded by ``PROBE_TIMEOUT_S``: a server that answered none for
``hung_after`` seconds (alive but stopped or deadlocked) is killed and restarted like a
dead one, and so at once is one that answered and whose NBD socket is gone. Until then
its I/O waits: the attach path never lets the kernel abandon a request to a live server
(see ``zerofs_csi.nbd``), so this is the only way a hung server's requests move on,
resent on the reconnected device.

A server that exited fenced (another server of the volume opened its storage since it
started: the volume went to another node, ``base.fenced_in`` its output) is not
restarted: a restart would open the storage again and fence the newer writer in turn,
and the two would take the volume from each other, each one's unflushed writes lost.
Its device's I/O then fails once the link monitor gives up; a later NodeStage here (the
CO giving the volume back to this node) starts a server again.

``stop`` sends SIGTERM, waits ``stop_timeout``, then SIGKILLs the server's process
group, and removes the sockets and run files; the log stays for diagnosis and the
volume's data (in the storage URL) is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from zerofs_csi import errors
from zerofs_csi.host import procfs
from zerofs_csi.nbd import _nbd
from zerofs_csi.observability.sanitize import MASK, REDACTOR
from zerofs_csi.servers import lives
from zerofs_csi.servers.base import ServerSockets, fenced_in
from zerofs_csi.servers.local_state import (
    LocalServer,
    ServerPaths,
    load_state,
    read_log,
    remove_socket,
    save_state,
    stored_secrets,
    write_private,
)
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_RESTART_BACKOFF = (0.5, 30.0)
STABLE_AFTER = 60.0
DEFAULT_HUNG_AFTER = 60.0
PROBE_EVERY_S = 2.0
PROBE_TIMEOUT_S = 2.0
LOG_ROTATE_BYTES = 1 << 20
LOG_TAIL_LINES = 15
LOG_TAIL_BYTES = 8192
# How much of a dead server's output is searched for why it exited.
EXIT_OUTPUT_BYTES = 64 << 10
# Variables of the plugin's environment a server may need; nothing else is passed on.
INHERITED_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def nbd_server_answers(socket_path: Path, timeout: float) -> bool:
    """Whether an NBD server greets on ``socket_path`` within ``timeout`` (the attach
    path's own handshake code reads the greeting and ends the session)."""
    try:
        _nbd.greet(str(socket_path), timeout)
    except OSError:
        return False
    return True


class ProcessBackend:
    """Runs per-volume ZeroFS servers as child processes (see the module docstring).

    ``command`` is the ZeroFS executable (or an argv prefix); the server runs
    ``command run -c <config>``. ``close()`` stops supervising without stopping the
    servers, as a plugin exit does; a new instance on the same ``state_dir`` adopts
    them.
    """

    name = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        socket_root: Path | None = None,
        command: str | Sequence[str] = "zerofs",
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        restart_backoff: tuple[float, float] = DEFAULT_RESTART_BACKOFF,
        supervise_interval: float = 0.2,
        hung_after: float = DEFAULT_HUNG_AFTER,
    ) -> None:
        if not state_dir.is_absolute():
            raise ValueError(f"state directory must be an absolute path: {state_dir}")
        self._servers_dir = state_dir / "servers"
        self._socket_root = socket_root if socket_root is not None else state_dir / "sockets"
        self._command = [command] if isinstance(command, str) else list(command)
        if not self._command:
            raise ValueError("the ZeroFS command must not be empty")
        self._stop_timeout = stop_timeout
        self._backoff_base, self._backoff_max = restart_backoff
        self._interval = supervise_interval
        self._hung_after = hung_after
        self._registry = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._servers: dict[str, LocalServer] = {}
        self._closing = threading.Event()
        self._servers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._adopt_all()
        self._supervisor = threading.Thread(
            target=self._supervise, name="volume-server-supervisor", daemon=True
        )
        self._supervisor.start()

    # ------------------------------------------------------------ interface

    def sockets(self, volume_id: str) -> ServerSockets:
        return ServerSockets.of_volume(self._socket_root, volume_id)

    def running(self) -> list[str]:
        """Volumes whose server this backend keeps running, including one waiting for
        its restart after a crash."""
        with self._registry:
            return sorted(self._servers)

    def ensure(self, volume_id: str, settings: object, secrets: object) -> ServerSockets:
        """Start (or reuse) the volume's server and wait until its NBD socket greets.

        Raises InvalidArgument for unusable settings, FailedPrecondition when the
        command cannot be run, Unavailable when the server exits while starting and
        DeadlineExceeded when it does not answer within the settings' ready timeout;
        both with the last lines of its log.
        """
        validate_volume_id(volume_id)
        if not isinstance(settings, VolumeSettings) or not isinstance(secrets, VolumeSecrets):
            raise errors.Internal(
                "the local process backend needs VolumeSettings and VolumeSecrets"
            )
        sockets = self.sockets(volume_id)
        paths = self._paths(volume_id)
        rendered = render_zerofs_config(
            settings,
            volume_id,
            secrets,
            cache_dir=str(paths.cache),
            nbd_socket=str(sockets.nbd),
            ninep_socket=str(sockets.ninep),
            rpc_socket=str(sockets.admin),
        )
        secret_env = dict(rendered.secret_env)
        REDACTOR.remember(list(secret_env.values()))
        argv = [*self._command, "run", "-c", str(paths.config)]
        if settings.read_only_server:
            argv.append("--read-only")
        environment = {k: os.environ[k] for k in INHERITED_ENVIRONMENT if k in os.environ}
        environment["RUST_LOG"] = settings.rust_log
        config_hash = hashlib.sha256(
            json.dumps(
                {"argv": argv, "config": rendered.toml_text, "environment": environment},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        timeout = float(settings.pod_ready_timeout_seconds)

        with self._volume_lock(volume_id):
            server = self._servers.get(volume_id)
            if (
                server is not None
                and server.config_hash == config_hash
                and stored_secrets(paths) == secret_env
            ):
                if not self._alive(server):
                    log.info(
                        "volume server not running: starting it now", extra=self._fields(server)
                    )
                    self._record_exit(server)
                    self._spawn(server, secret_env)
                    server.restarts += 1
                    save_state(self._paths(server.volume_id), server)
            else:
                if server is not None:
                    log.info(
                        "volume server config changed: replacing the server",
                        extra=self._fields(server),
                    )
                    self._terminate(server)
                    self._forget(volume_id)
                paths.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                paths.directory.chmod(0o700)
                write_private(paths.config, rendered.toml_text.encode())
                write_private(paths.secrets, json.dumps(secret_env).encode())
                server = LocalServer(volume_id, argv, config_hash, environment)
                self._spawn(server, secret_env)
                save_state(self._paths(server.volume_id), server)
                with self._registry:
                    self._servers[volume_id] = server
            try:
                self._wait_ready(server, sockets, timeout, secret_env)
                self._answered(server)
            except errors.CsiError:
                # One writer per volume, nothing half started: a server that did not
                # come up is stopped before the error goes back.
                self._terminate(server)
                self._forget(volume_id)
                self._remove_run_files(volume_id)
                raise
        return sockets

    def stop(self, volume_id: str) -> None:
        """Stop the volume's server and remove its sockets and run files. Succeeds when
        nothing runs; bounded by about twice ``stop_timeout``."""
        validate_volume_id(volume_id)
        with self._volume_lock(volume_id):
            with self._registry:
                server = self._servers.pop(volume_id, None)
            if server is None:
                server = load_state(self._paths(volume_id), volume_id)
            if server is not None:
                self._terminate(server)
                log.info("volume server stopped", extra=self._fields(server))
            self._remove_run_files(volume_id)

    def restarts(self, volume_id: str) -> int:
        """How often the volume's server was restarted after dying."""
        with self._registry:
            server = self._servers.get(volume_id)
        return server.restarts if server is not None else 0

    def pid(self, volume_id: str) -> int | None:
        """The pid of the volume's server while it runs."""
        with self._registry:
            server = self._servers.get(volume_id)
        return server.pid if server is not None and self._alive(server) else None

    def close(self) -> None:
        """Stop supervising. The servers keep running, to be adopted by the next
        instance (as after a plugin restart)."""
        self._closing.set()
        self._supervisor.join(5)

    # ------------------------------------------------------------ processes

    def _paths(self, volume_id: str) -> ServerPaths:
        return ServerPaths(self._servers_dir / volume_id)

    def _volume_lock(self, volume_id: str) -> threading.Lock:
        with self._registry:
            return self._locks.setdefault(volume_id, threading.Lock())

    def _forget(self, volume_id: str) -> None:
        with self._registry:
            self._servers.pop(volume_id, None)

    def _alive(self, server: LocalServer) -> bool:
        if server.process is not None:
            return server.process.poll() is None
        if not server.pid or server.boot_id != procfs.boot_id():
            return False
        fields = procfs.stat_fields(server.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == server.start_time

    def _spawn(self, server: LocalServer, secret_env: Mapping[str, str]) -> None:
        """Start the server process; raises FailedPrecondition if it cannot be run."""
        paths = self._paths(server.volume_id)
        sockets = self.sockets(server.volume_id)
        sockets.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        for path in (sockets.nbd, sockets.ninep, sockets.admin):
            remove_socket(path)  # a dead server's sockets would make bind() fail
        paths.cache.mkdir(exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            if paths.log.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(paths.log, paths.log.with_name("server.log.1"))
        lives.record_start(sockets.directory)
        fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log_file.write(f"--- {stamp} zerofs-csi: starting {shlex.join(server.argv)}\n".encode())
            log_file.flush()
            server.log_offset = log_file.tell()
            try:
                process = subprocess.Popen(
                    server.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env={**server.environment, **secret_env},
                    cwd=paths.directory,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise errors.FailedPrecondition(
                    f"cannot run the ZeroFS command {server.argv[0]!r}: {exc.strerror}; "
                    "install zerofs or point --zerofs-command at it"
                ) from None
        server.process = process
        server.pid = process.pid
        server.start_time = procfs.start_time(process.pid) or 0
        server.boot_id = procfs.boot_id()
        server.started_at = server.answered_at = time.monotonic()
        server.answered = False
        server.restart_at = None
        server.fenced = False
        log.info("volume server started", extra=self._fields(server))

    def _answered(self, server: LocalServer) -> None:
        """The server greeted: recorded, the first time, in its state."""
        server.answered_at = time.monotonic()
        if not server.answered:
            server.answered = True
            save_state(self._paths(server.volume_id), server)

    def _terminate(self, server: LocalServer) -> None:
        """SIGTERM the server, wait, SIGKILL its process group, kill what is left.

        A server found dead is left alone: its pid may already belong to someone else.
        """
        if not self._alive(server):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
        if not self._wait_gone(server, self._stop_timeout):
            log.warning("volume server ignored SIGTERM; killing it", extra=self._fields(server))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            self._wait_gone(server, 5.0)
        self._kill_group_leftovers(server)
        self._record_exit(server)

    def _record_exit(self, server: LocalServer) -> None:
        """Append the dead server's end to its lives; its status is known for a child of
        this instance only (an adopted server's is not)."""
        returncode = server.process.returncode if server.process is not None else None
        status = None if returncode is None else lives.shell_status(returncode)
        lives.record_exit(self.sockets(server.volume_id).directory, status)

    def _wait_gone(self, server: LocalServer, timeout: float) -> bool:
        """Whether the server exits within ``timeout``. A pidfd wakes the wait the moment
        it does (Popen.wait and a sleep loop would poll, up to 50 ms late)."""
        try:
            pidfd = os.pidfd_open(server.pid)
        except ProcessLookupError:
            pidfd = -1  # exited and reaped already
        if pidfd >= 0:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                if not poller.poll(max(0, int(timeout * 1000))):
                    return False
            finally:
                os.close(pidfd)
        if server.process is not None:
            server.process.wait()  # reaps it: it has exited
        return True

    def _kill_group_leftovers(self, server: LocalServer) -> None:
        """SIGKILL what is left of the dead server's process group (children it did not
        stop). The server led its own session and group, and the kernel does not hand
        out a group's id as a new pid while any member lives, so the signal reaches the
        server's leftovers and nobody else; without members it finds nothing (ESRCH)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)

    def _wait_ready(
        self,
        server: LocalServer,
        sockets: ServerSockets,
        timeout: float,
        secret_env: Mapping[str, str],
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self._alive(server):
                status = server.process.returncode if server.process is not None else None
                how = f"exited with status {status}" if status is not None else "exited"
                raise errors.Unavailable(
                    f"volume server for {server.volume_id} {how} while starting"
                    + self._log_tail(server.volume_id, secret_env)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(
                    f"volume server for {server.volume_id} did not answer on {sockets.nbd} "
                    f"within {timeout:g}s" + self._log_tail(server.volume_id, secret_env)
                )
            if sockets.nbd.exists() and nbd_server_answers(sockets.nbd, min(remaining, 2.0)):
                return
            time.sleep(min(0.05, max(remaining, 0)))

    def _log_tail(self, volume_id: str, secret_env: Mapping[str, str]) -> str:
        path = self._paths(volume_id).log
        text = read_log(path, at_most=LOG_TAIL_BYTES)
        if text is None:
            return f" (no log at {path})"
        for value in sorted(secret_env.values(), key=len, reverse=True):
            if value:
                text = text.replace(value, MASK)
        lines = REDACTOR.redact(text).splitlines()[-LOG_TAIL_LINES:]
        return f"; last lines of {path}:\n" + "\n".join(lines)

    # ------------------------------------------------------------ run files

    def _remove_run_files(self, volume_id: str) -> None:
        sockets = self.sockets(volume_id)
        paths = self._paths(volume_id)
        for path in (sockets.nbd, sockets.ninep, sockets.admin):
            remove_socket(path)
        sockets.lives.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            sockets.directory.rmdir()
        for path in (paths.state, paths.config, paths.secrets):
            path.unlink(missing_ok=True)
        shutil.rmtree(paths.cache, ignore_errors=True)

    def _adopt_all(self) -> None:
        """Take over the servers a previous instance left running (or meant to)."""
        for entry in sorted(self._servers_dir.iterdir()):
            try:
                validate_volume_id(entry.name)
            except errors.InvalidArgument:
                continue
            server = load_state(self._paths(entry.name), entry.name)
            if server is None:
                continue
            if not self._alive(server):
                self._record_exit(server)
                if not self._note_fenced(server):
                    # It died while nobody watched: the supervisor restarts it at once.
                    server.restart_at = time.monotonic()
            server.started_at = server.answered_at = time.monotonic()
            self._servers[entry.name] = server
            log.info(
                "volume server adopted",
                extra=self._fields(server, alive=server.restart_at is None),
            )

    # ------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        while not self._closing.wait(self._interval):
            with self._registry:
                volume_ids = list(self._servers)
            for volume_id in volume_ids:
                lock = self._volume_lock(volume_id)
                # A volume busy in ensure/stop is looked at next round.
                if not lock.acquire(blocking=False):
                    continue
                try:
                    self._supervise_one(volume_id)
                except Exception:
                    log.exception(
                        "supervising volume server failed", extra={"volume_id": volume_id}
                    )
                finally:
                    lock.release()

    def _supervise_one(self, volume_id: str) -> None:
        with self._registry:
            server = self._servers.get(volume_id)
        if server is None:
            return
        now = time.monotonic()
        if self._alive(server):
            if server.failures and now - server.started_at >= STABLE_AFTER:
                server.failures = 0
            if self._hung_after > 0 and now >= server.probe_at:
                self._probe(server, now)
            return
        if server.fenced:
            return
        if server.restart_at is None:
            # Whatever the dead server left running (its children) could still hold its
            # sockets and answer nothing: it goes before a new server starts.
            self._kill_group_leftovers(server)
            self._record_exit(server)
            if self._note_fenced(server):
                return
            server.failures += 1
            delay = min(self._backoff_base * 2 ** (server.failures - 1), self._backoff_max)
            server.restart_at = now + delay
            status = server.process.returncode if server.process is not None else None
            log.warning(
                "volume server died; restarting it",
                extra=self._fields(server, exit_status=status, restart_in=round(delay, 3)),
            )
            return
        if now < server.restart_at:
            return
        secret_env = stored_secrets(self._paths(volume_id))
        if secret_env is None:
            log.error(
                "volume server cannot be restarted: its secrets file is missing",
                extra=self._fields(server),
            )
            server.restart_at = now + self._backoff_max
            return
        try:
            self._spawn(server, secret_env)
        except errors.CsiError as exc:
            server.failures += 1
            server.restart_at = now + self._backoff_max
            log.error("volume server restart failed", extra=self._fields(server, error=exc.message))
            return
        server.restarts += 1
        save_state(self._paths(server.volume_id), server)

    def _note_fenced(self, server: LocalServer) -> bool:
        """Whether the dead server exited fenced (its output since its start says so);
        if so it is marked, in its state too, and reported once."""
        if server.fenced:
            return True
        log_path = self._paths(server.volume_id).log
        output = read_log(log_path, since=server.log_offset, at_most=EXIT_OUTPUT_BYTES)
        if output is None or not fenced_in(output):
            return False
        server.fenced = True
        save_state(self._paths(server.volume_id), server)
        log.error(
            "volume server was fenced: another server of the volume opened its storage "
            "since it started (the volume is in use on another node); not restarting it, "
            "so that the two do not take the volume from each other. Its device fails "
            "its I/O once the link monitor gives up; a NodeStage here starts a server again",
            extra=self._fields(server),
        )
        return True

    def _probe(self, server: LocalServer, now: float) -> None:
        """Handshake with the server; kill it when it answered none for ``hung_after``
        seconds (the next round restarts it as a dead one)."""
        server.probe_at = now + PROBE_EVERY_S
        nbd_socket = self.sockets(server.volume_id).nbd
        if nbd_server_answers(nbd_socket, PROBE_TIMEOUT_S):
            self._answered(server)
            return
        silent = time.monotonic() - server.answered_at
        # A server binds its socket once: one that answered (this instance or the one
        # before it) and whose socket is gone (a cleaner of the directory, a hand) can
        # never be reached again, however long it is given.
        unreachable = server.answered and not nbd_socket.exists()
        if silent < self._hung_after and not unreachable:
            return
        log.warning(
            "volume server's NBD socket is gone: killing it"
            if unreachable
            else "volume server answers no NBD handshake: killing it as hung",
            extra=self._fields(server, silent_s=round(silent, 1)),
        )
        # SIGKILL also ends a stopped process; the group takes its children along.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)

    def _fields(self, server: LocalServer, **more: object) -> dict[str, object]:
        return {
            "volume_id": server.volume_id,
            "pid": server.pid,
            "restarts": server.restarts,
            "backend": self.name,
            **more,
        }
