"""A ZeroFS stand-in built from real servers, for tests and demos without a ``zerofs``.

Command line as ZeroFS's: ``zerofs-standin run -c CONFIG`` (or ``--config CONFIG``).
It reads the TOML file the driver rendered, checks it the way ZeroFS 2.3 would for the
keys it knows, expands ``$VAR``/``${VAR}``/``${VAR:-default}`` from its environment
where ZeroFS does, and then serves the volume:

- storage: only ``file:///path`` (a ZeroFS backend too). The volume's files live in
  that directory, so they outlive the process, an unstage and a restage.
- NBD: nbdkit's file plugin in ``dir=`` mode on ``[servers.nbd] unix_socket``; each
  file of ``<storage>/.nbd/`` is an export named after it, sized by the file at
  connect time, new files visible without restart, exactly as ZeroFS's ``.nbd/``.
  The plugin advertises CAN_MULTI_CONN (every connection opens the same file, and a
  flush is an fdatasync of it), FLUSH and native FUA (fdatasync after the write).
  ``--no-sr`` matches ZeroFS, which answers STRUCTURED_REPLY with ERR_UNSUP.
  Writes land in the host page cache when acknowledged, so data survives a kill -9 of
  the stand-in; flushed data also survives a host crash.
- 9P2000.L: diod exporting the same directory, behind a small relay on
  ``[servers.ninep] unix_socket``. diod only attaches clients that name the exported
  path as ``aname``, while ZeroFS ignores ``aname``; the relay rewrites the aname of
  Tattach/Tauth to the storage directory and passes every other byte through.

It stays in the foreground. SIGTERM/SIGINT stop both servers and remove the sockets
(exit 0); nbdkit is killed rather than stopped, so that, as with ZeroFS, a client sees
its connections close and never an error reply. If either server dies, the other is
stopped and the stand-in exits 1, so a supervisor restarts it. The children die with it
even on SIGKILL (PR_SET_PDEATHSIG with SIGKILL). Secrets are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROGRAM = "zerofs-standin"

# ZeroFS 2.3 configuration schema (zerofs/src/config.rs, documentation configuration
# page): the tables, their keys and value kinds this stand-in checks. Tables marked
# None are accepted without checking their keys (their schema is not needed here).
NUMBER = "number"
INTEGER = "integer"
BOOLEAN = "boolean"
STRING = "string"
STRING_LIST = "list of strings"
TABLE_KEYS: Mapping[str, Mapping[str, str] | None] = {
    "cache": {
        "dir": STRING,
        "disk_size_gb": NUMBER,
        "memory_size_gb": NUMBER,
        "warm_metadata": BOOLEAN,
    },
    "storage": {"url": STRING, "encryption_password": STRING, "storage_class": STRING},
    "servers": None,  # checked by _check_servers
    "filesystem": {"max_size_gb": NUMBER, "compression": STRING, "ignore_fsync": BOOLEAN},
    "lsm": {
        "l0_max_ssts": INTEGER,
        "max_concurrent_compactions": INTEGER,
        "flush_interval_secs": INTEGER,
        "sync_writes": BOOLEAN,
    },
    "telemetry": {"enabled": BOOLEAN},
    "prometheus": {"addresses": STRING_LIST},
    "gc": None,
    "replication": None,
    # Free-form object_store options: every value a string, unknown keys dropped.
    "aws": None,
    "azure": None,
    "gcp": None,
}
REQUIRED = {"cache": ("dir", "disk_size_gb"), "storage": ("url", "encryption_password")}
SERVER_KEYS: Mapping[str, frozenset[str]] = {
    "nfs": frozenset({"addresses"}),
    "ninep": frozenset({"addresses", "unix_socket"}),
    "nbd": frozenset({"addresses", "unix_socket"}),
    "rpc": frozenset({"addresses", "unix_socket"}),
    "webui": frozenset({"addresses"}),
}
FREE_FORM_TABLES = ("aws", "azure", "gcp")

# 9P message types (Linux include/net/9p/9p.h) the relay rewrites.
P9_TAUTH = 102
P9_TATTACH = 104
# A 9P frame larger than this is not a 9P client talking.
P9_MAX_FRAME = 16 << 20

# The servers get only these variables: never the secrets the config's ${VAR}s name.
CHILD_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")

# prctl(2): PR_SET_PDEATHSIG (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1

_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|"
    r"(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class ConfigError(Exception):
    """The configuration cannot be served; the message says why (never a secret)."""


def say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class StandinConfig:
    storage_dir: Path
    cache_dir: Path
    nbd_socket: Path
    ninep_socket: Path


def expand_variables(value: str, environ: Mapping[str, str], where: str) -> str:
    """Shell-style ``$NAME``, ``${NAME}`` and ``${NAME:-default}`` from ``environ``; an
    unset variable without a default is an error, as in ZeroFS."""

    def substitute(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        if name in environ:
            return environ[name]
        if match["default"] is not None:
            return match["default"]
        raise ConfigError(f"{where}: environment variable {name} is not set")

    return _VARIABLE.sub(substitute, value)


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == STRING:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_table(name: str, table: Any, keys: Mapping[str, str]) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(
                f"unknown field `{key}` in [{name}], expected one of: " + ", ".join(keys)
            )
        if not _kind_ok(value, keys[key]):
            raise ConfigError(f"{name}.{key} must be a {keys[key]}")
    for key in REQUIRED.get(name, ()):
        if key not in table:
            raise ConfigError(f"missing field `{key}` in [{name}]")


def _check_servers(servers: Any) -> None:
    if not isinstance(servers, dict):
        raise ConfigError("[servers] must be a table")
    listeners = 0
    for name, table in servers.items():
        if name not in SERVER_KEYS:
            raise ConfigError(
                f"unknown field `{name}` in [servers], expected one of: " + ", ".join(SERVER_KEYS)
            )
        kinds = {"addresses": STRING_LIST, "unix_socket": STRING}
        _check_table(f"servers.{name}", table, {k: kinds[k] for k in SERVER_KEYS[name]})
        listeners += len(table.get("addresses", ())) + ("unix_socket" in table)
    if listeners == 0:
        raise ConfigError("[servers] configures no listener")


def storage_directory(url: str) -> Path:
    """The local directory of a ``file:///path`` storage URL."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme != "file":
        shown = f"{scheme}://" if scheme else "this URL"
        raise ConfigError(
            f"storage.url: the stand-in only serves file:// storage (got {shown}); "
            "run a real zerofs for object storage"
        )
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise ConfigError("storage.url: expected file:///absolute/path")
    path = urllib.parse.unquote(parsed.path)
    if not path.startswith("/") or ".." in Path(path).parts:
        raise ConfigError("storage.url: expected file:///absolute/path without '..'")
    return Path(path)


def load_config(path: Path, environ: Mapping[str, str]) -> StandinConfig:
    """Read and check a ZeroFS config file; ConfigError says what is wrong."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"Failed to read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Failed to parse config file {path}: {exc}") from None

    for name in document:
        if name not in TABLE_KEYS:
            raise ConfigError(f"unknown field `{name}`, expected one of: " + ", ".join(TABLE_KEYS))
    for name in ("cache", "storage", "servers"):
        if name not in document:
            raise ConfigError(f"missing field `{name}`")
    for name, keys in TABLE_KEYS.items():
        if name in document and keys is not None:
            _check_table(name, document[name], keys)
    _check_servers(document["servers"])
    for name in FREE_FORM_TABLES:
        table = document.get(name, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ConfigError(f"[{name}] values must all be strings")
        for key, value in table.items():
            expand_variables(value, environ, f"{name}.{key}")  # fails on an unset variable

    cache_dir = expand_variables(document["cache"]["dir"], environ, "cache.dir")
    url = expand_variables(document["storage"]["url"], environ, "storage.url")
    # The password is not used (nothing is encrypted here) but must resolve, as in ZeroFS.
    expand_variables(
        document["storage"]["encryption_password"], environ, "storage.encryption_password"
    )
    sockets = {}
    for name in ("nbd", "ninep"):
        table = document["servers"].get(name, {})
        if table.get("addresses"):
            raise ConfigError(
                f"servers.{name}.addresses: the stand-in serves only unix sockets "
                "(ZeroFS's NBD server has no authentication: keep it off the network)"
            )
        if "unix_socket" not in table:
            raise ConfigError(f"servers.{name}.unix_socket is required by the stand-in")
        where = f"servers.{name}.unix_socket"
        sockets[name] = Path(expand_variables(table["unix_socket"], environ, where))
        if not sockets[name].is_absolute():
            raise ConfigError(f"{where} must be an absolute path")
    if sockets["nbd"] == sockets["ninep"]:
        raise ConfigError("the NBD and 9P unix sockets must be different paths")
    return StandinConfig(
        storage_dir=storage_directory(url),
        cache_dir=Path(cache_dir),
        nbd_socket=sockets["nbd"],
        ninep_socket=sockets["ninep"],
    )


# ---------------------------------------------------------------------------------
# 9P relay


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def rewrite_aname(frame: bytes, aname: bytes) -> bytes:
    """A Tattach or Tauth frame with its aname replaced; other frames unchanged.

    Tattach: size[4] type[1] tag[2] fid[4] afid[4] uname[s] aname[s] n_uname[4]
    Tauth:   size[4] type[1] tag[2] afid[4] uname[s] aname[s] n_uname[4]
    """
    msg_type = frame[4]
    if msg_type == P9_TATTACH:
        uname_at = 15
    elif msg_type == P9_TAUTH:
        uname_at = 11
    else:
        return frame
    (uname_length,) = struct.unpack_from("<H", frame, uname_at)
    aname_at = uname_at + 2 + uname_length
    (aname_length,) = struct.unpack_from("<H", frame, aname_at)
    tail = frame[aname_at + 2 + aname_length :]
    body = frame[4:aname_at] + struct.pack("<H", len(aname)) + aname + tail
    return struct.pack("<I", 4 + len(body)) + body


class NinePRelay:
    """Accepts 9P clients on ``public`` and connects each to diod on ``private``."""

    def __init__(self, public: Path, private: Path, aname: Path) -> None:
        self._private = str(private)
        self._aname = str(aname).encode()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(public))
        self._listener.listen(64)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="9p-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        # shutdown() wakes the accept() blocked in the relay thread.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self._private)
        except OSError as exc:
            say(f"9P relay: diod is not answering ({exc.strerror})")
            server.close()
            client.close()
            return
        replies = threading.Thread(target=self._copy, args=(server, client), daemon=True)
        replies.start()
        try:
            while True:
                header = _recv_exact(client, 4)
                if header is None:
                    break
                (size,) = struct.unpack("<I", header)
                if not 7 <= size <= P9_MAX_FRAME:
                    say(f"9P relay: dropping a client that sent a {size}-byte frame")
                    break
                rest = _recv_exact(client, size - 4)
                if rest is None:
                    break
                server.sendall(rewrite_aname(header + rest, self._aname))
        except OSError:
            pass
        finally:
            for sock in (server, client):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            replies.join(2)
            server.close()
            client.close()

    @staticmethod
    def _copy(source: socket.socket, destination: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                destination.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                destination.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------
# Servers


def _find(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        raise ConfigError(f"{program} not found: install the Debian package {package}")
    return path


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the stand-in dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _remove_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


# Generous: dozens of volume servers starting at once on a small node can keep diod from
# listening for many seconds; the driver's own ready timeout bounds the whole start.
DIOD_START_TIMEOUT_S = 120.0


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if process.poll() is not None:
            raise ConfigError(f"diod exited with status {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise ConfigError(f"diod did not listen on {path} within {timeout:g}s")
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes], name: str, timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{name} ignored SIGTERM for {timeout:g}s; killing it")
        process.kill()
        process.wait()


class Stop(Exception):
    """Raised in the main thread by the SIGTERM/SIGINT handler."""


def serve(config: StandinConfig) -> int:
    nbd_dir = config.storage_dir / ".nbd"
    nbd_dir.mkdir(parents=True, exist_ok=True)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    nbdkit = _find("nbdkit", "nbdkit")
    diod = _find("diod", "diod")
    for path in (config.nbd_socket, config.ninep_socket):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_socket(path)  # left by a stand-in that was killed

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    child_env = {name: os.environ[name] for name in CHILD_ENVIRONMENT if name in os.environ}
    private_dir = Path(tempfile.mkdtemp(prefix="zerofs-standin-"))
    children: dict[str, subprocess.Popen[bytes]] = {}
    relay: NinePRelay | None = None
    status = 1
    try:
        private_socket = private_dir / "diod.sock"
        argv = [diod, "-f", "-n", "-N", "-e", str(config.storage_dir)]
        argv += ["-l", str(private_socket), "-L", "stderr"]
        if os.geteuid() != 0:
            argv.append("-S")  # a non-root diod serves every user as itself
        # diod raises its own core limit: a crash must dump in the private dir, not
        # in whatever directory the stand-in was started from.
        children["diod"] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=private_dir,
            preexec_fn=_die_with_parent,
        )
        _wait_for_socket(private_socket, children["diod"], DIOD_START_TIMEOUT_S)
        relay = NinePRelay(config.ninep_socket, private_socket, config.storage_dir)
        # Last, so that the NBD socket answering means both servers are up.
        children["nbdkit"] = subprocess.Popen(
            [
                nbdkit,
                "--foreground",
                "--no-sr",
                "--log=stderr",
                "--unix",
                str(config.nbd_socket),
                "file",
                f"dir={nbd_dir}",
            ],
            stdin=subprocess.DEVNULL,
            env=child_env,
            # SIGKILL with the stand-in, as one ZeroFS process dies. Not nbdkit's own
            # --exit-with-parent: it replaces this with SIGTERM, and a gracefully
            # stopping nbdkit keeps its listening socket open without accepting, for as
            # long as the kernel holds the dead connections, so a reconnect hangs on it.
            preexec_fn=_die_with_parent,
        )
        say(
            f"serving file://{config.storage_dir}: NBD on {config.nbd_socket} "
            f"(nbdkit pid {children['nbdkit'].pid}), 9P2000.L on {config.ninep_socket} "
            f"(diod pid {children['diod'].pid})"
        )
        while True:
            for name, child in children.items():
                if child.poll() is not None:
                    say(f"{name} exited unexpectedly with status {child.returncode}")
                    return 1
            time.sleep(0.1)
    except Stop as stop:
        say(f"{stop.args[0]}: stopping")
        status = 0
    except ConfigError as exc:
        say(str(exc))
    finally:
        # Stop handlers firing during cleanup would abort it half done.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # nbdkit stopping gracefully answers the requests it still reads with
        # NBD_ESHUTDOWN, which the kernel turns into EIO. ZeroFS never answers with an
        # error when it stops: it finishes the request each connection is executing and
        # closes the connection, and the kernel resends the rest on the reconnected
        # device. Killed, nbdkit closes its connections without answering anything more;
        # every write it acknowledged is already in the file (docs/zerofs-compatibility.md).
        if "nbdkit" in children:
            children["nbdkit"].kill()
            children["nbdkit"].wait()
        if "diod" in children:
            _stop(children["diod"], "diod")
        if relay is not None:
            relay.close()
        for path in (config.nbd_socket, config.ninep_socket):
            _remove_socket(path)
        shutil.rmtree(private_dir, ignore_errors=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve the volume described by a ZeroFS config")
    run.add_argument("-c", "--config", type=Path, required=True, help="ZeroFS TOML config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 1
    try:
        return serve(config)
    except ConfigError as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
