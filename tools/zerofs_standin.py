"""A ZeroFS stand-in built from real servers, for tests and demos without a ``zerofs``.

Command line as ZeroFS's: ``zerofs-standin run -c CONFIG`` (or ``--config CONFIG``).
It reads the TOML file the driver rendered, checks it the way ZeroFS 2.3 would for the
keys it knows, expands ``$VAR``/``${VAR}``/``${VAR:-default}`` from its environment
where ZeroFS does, and then serves the volume:

- storage ``file:///path`` (a ZeroFS backend too): the volume's files live in that
  directory, so they outlive the process, an unstage and a restage.
- storage ``s3://bucket/prefix`` (or ``s3a://``): the NBD exports' blocks and sizes
  live in S3 under ``prefix/``, and nothing of the volume anywhere else in the bucket;
  the 9P tree is a local directory under ``[cache] dir``. S3 options as ZeroFS takes
  them: ``AWS_*`` variables of the environment, overridden by the ``[aws]`` table
  (``S3_OPTIONS``). The bucket is checked at start: an endpoint that does not answer,
  a missing bucket or refused credentials are an error naming the storage URL.
- NBD on ``[servers.nbd] unix_socket``: each file of ``<9P tree>/.nbd/`` is an export
  named after it, sized by the file at connect time, new files visible without
  restart, exactly as ZeroFS's ``.nbd/``. For file:// storage nbdkit's file plugin in
  ``dir=`` mode serves them: CAN_MULTI_CONN (every connection opens the same file, and
  a flush is an fdatasync of it), FLUSH and native FUA (fdatasync after the write);
  writes land in the host page cache when acknowledged, so data survives a kill -9 of
  the stand-in, and flushed data a host crash. For s3:// nbdkit's S3 plugin serves
  them (zerofs_standin_s3.py) and, as ZeroFS, stores a write in S3 only at a flush: an
  NBD flush, a FUA write, its own every ``[lsm] flush_interval_secs`` (30 s by
  default) or its graceful stop. Until then answered writes are dirty objects in a
  write-back area of this life of the server, under ``[cache] dir``, which a kill -9
  loses: the next start discards them unstored, as ZeroFS loses its memtable. With
  ``[lsm] sync_writes = true`` each write is stored before it is answered.
  ``--no-sr`` matches ZeroFS, which answers STRUCTURED_REPLY with ERR_UNSUP.
- 9P2000.L: diod exporting the 9P tree, behind a small relay on
  ``[servers.ninep] unix_socket``. diod only attaches clients that name the exported
  path as ``aname``, while ZeroFS ignores ``aname``; the relay rewrites the aname of
  Tattach/Tauth to the exported directory and passes every other byte through.

- The admin service (``zerofs.admin.AdminService``: checkpoints and flush) on
  ``[servers.rpc] unix_socket`` when the config has one, and the CLI commands that call
  it, ``checkpoint create|list|delete|info -c CONFIG [NAME]`` and ``flush -c CONFIG``;
  ``run --checkpoint NAME`` serves a checkpoint and ``run --read-only`` the live volume,
  both read-only (NBD and 9P). See zerofs_standin_admin.py, and ``S3Checkpoints`` for
  s3:// storage. As ZeroFS's, a read-only NBD export does not say so at negotiation (no
  NBD_FLAG_READ_ONLY) and fails each write, trim and zeroing with EIO (nbdkit's error
  filter; ZeroFS fails flushes too, which Debian's nbdkit error filter cannot).

It stays in the foreground. SIGTERM/SIGINT stop both servers, store the dirty objects
in S3 (the final flush) and remove the sockets (exit 0); nbdkit is killed rather than
stopped, so that, as with ZeroFS, a client sees its connections close and never an
error reply. If either server dies, the other is stopped and the stand-in exits 1, so a
supervisor restarts it. The children die with it even on SIGKILL (PR_SET_PDEATHSIG with
SIGKILL). Secrets are never printed, and S3 credentials reach nbdkit through its
environment only, never its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
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
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zerofs_standin_admin as admin  # noqa: E402

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

# The directory of NBD exports in the served tree, as in ZeroFS; on S3 the size records
# of the exports have the same name under the prefix, their blocks the other one.
EXPORT_DIRECTORY = admin.EXPORT_DIRECTORY
BLOCKS_DIRECTORY = ".nbd-blocks"
# S3 object size of the exports' blocks: the largest request the kernel's NBD client
# sends by default on the nodes' kernel (max_sectors_kb 128 on Debian 12's 6.1), so that
# sequential writes are whole-object PUTs, to different objects when they run in
# parallel. A write into part of an object is a read-modify-write of it (GET and PUT),
# and writes to one object wait for each other: against radosgw, 128 KiB writes ran at
# 9.4 MiB/s with 128 KiB objects and 2.3 MiB/s with 1 MiB ones; 4 KiB writes cost the
# same with either (18 and 22 a second: two requests' latency each).
OBJECT_SIZE = 128 << 10
# The storage URL schemes object_store serves from S3 (object_store's ObjectStoreScheme).
S3_SCHEMES = ("s3", "s3a")
# S3 options the stand-in honours, under the names object_store 0.14 (ZeroFS 2.3's) reads
# them: an AWS_* variable lowercased, or "aws_" + an [aws] key (src/aws/builder.rs,
# AmazonS3ConfigKey::from_str; ZeroFS's config.rs cloud_provider_env_vars).
S3_OPTIONS: Mapping[str, str] = {
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
    "aws_token": "session_token",
    "aws_region": "region",
    "aws_default_region": "default_region",
    "aws_endpoint": "endpoint",
    "aws_endpoint_url": "endpoint",
    "aws_endpoint_url_s3": "s3_endpoint",
    "aws_allow_http": "allow_http",
}
# object_store's default region, and its words for booleans (src/config.rs, Parse).
DEFAULT_REGION = "us-east-1"
TRUE_WORDS = ("1", "true", "on", "yes", "y")
FALSE_WORDS = ("0", "false", "off", "no", "n")
# The bucket check at start fails within seconds rather than hang on a dead endpoint.
S3_CHECK_TIMEOUT_S = 5
# ZeroFS's periodic flush: [lsm] flush_interval_secs, its default and the minimum it
# raises a smaller value to (LsmConfig, config.rs v2.3.0).
DEFAULT_FLUSH_INTERVAL_S = 30
MIN_FLUSH_INTERVAL_S = 5
# Under [cache] dir: one directory per life of a writable s3:// server, holding the
# objects written since their last flush (see "Write-back" below).
WRITE_BACK_DIRECTORY = "write-back"
# Objects stored at once by a flush.
STORE_WORKERS = 8

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
class S3Storage:
    """An s3:// storage URL and how to reach it; ``environment`` holds the credentials
    (AWS_* variables for the S3 clients) and is never shown."""

    url: str
    bucket: str
    prefix: str  # no leading or trailing '/'; "" for the bucket root
    endpoint: str | None
    region: str
    environment: Mapping[str, str] = field(repr=False, compare=False)
    ignored_options: tuple[str, ...] = ()

    @property
    def layout(self) -> S3Layout:
        return S3Layout(self.bucket, self.prefix)


@dataclass(frozen=True)
class StandinConfig:
    storage_dir: Path  # the tree served over 9P, whose .nbd/ files are the NBD exports
    cache_dir: Path
    nbd_socket: Path
    ninep_socket: Path
    s3: S3Storage | None = None
    rpc_socket: Path | None = None  # the admin service's ([servers.rpc] unix_socket)
    sync_writes: bool = False  # [lsm] sync_writes
    flush_interval_s: int = DEFAULT_FLUSH_INTERVAL_S  # [lsm] flush_interval_secs


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


def storage_scheme(url: str) -> str:
    return url.partition("://")[0] if "://" in url else ""


def storage_directory(url: str) -> Path:
    """The local directory of a ``file:///path`` storage URL."""
    scheme = storage_scheme(url)
    if scheme != "file":
        shown = f"{scheme}://" if scheme else "this URL"
        raise ConfigError(
            f"storage.url: the stand-in serves file:// and s3:// storage (got {shown}); "
            "run a real zerofs for other object stores"
        )
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise ConfigError("storage.url: expected file:///absolute/path")
    path = urllib.parse.unquote(parsed.path)
    if not path.startswith("/") or ".." in Path(path).parts:
        raise ConfigError("storage.url: expected file:///absolute/path without '..'")
    return Path(path)


def _truth(value: str, where: str) -> bool:
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: failed to parse {value!r} as a boolean")


def s3_storage(url: str, aws: Mapping[str, str], environ: Mapping[str, str]) -> S3Storage:
    """The bucket, prefix and S3 options of an ``s3://bucket/prefix`` storage URL.

    Options as ZeroFS 2.3 builds its store: every ``AWS_*`` variable of the environment
    first (object_store's ``from_env``), then each ``[aws]`` key as ``aws_<key>`` over
    them. ``aws`` holds the table's values with their variables expanded.
    """
    parsed = urllib.parse.urlsplit(url)
    if storage_scheme(url) not in S3_SCHEMES or not parsed.hostname:
        raise ConfigError("storage.url: expected s3://bucket/prefix")
    if parsed.username or parsed.password or parsed.query or parsed.fragment:
        raise ConfigError("storage.url: expected s3://bucket/prefix, without user or query")
    prefix = urllib.parse.unquote(parsed.path).strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError("storage.url: the prefix has an empty, '.' or '..' segment")
    shown = f"{parsed.scheme}://{parsed.netloc}/{prefix}"

    named = [(name.lower(), value) for name, value in environ.items() if name.startswith("AWS_")]
    named += [(f"aws_{key.lower()}", value) for key, value in aws.items()]
    options: dict[str, str] = {}
    for name, value in named:
        if name in S3_OPTIONS:
            options[S3_OPTIONS[name]] = value
    ignored = sorted(f"aws.{key}" for key in aws if f"aws_{key.lower()}" not in S3_OPTIONS)

    endpoint = options.get("s3_endpoint") or options.get("endpoint")
    allow_http = _truth(options.get("allow_http", "false"), f"{shown}: allow_http")
    if endpoint is not None:
        scheme = urllib.parse.urlsplit(endpoint).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"{shown}: the S3 endpoint must be an http:// or https:// URL")
        if scheme == "http" and not allow_http:
            raise ConfigError(
                f"{shown}: the S3 endpoint {_endpoint_shown(endpoint)} is plain http and "
                '[aws] allow_http is not "true"'
            )
    key_id = options.get("access_key_id")
    secret = options.get("secret_access_key")
    if (key_id is None) != (secret is None):
        missing = "secret_access_key" if secret is None else "access_key_id"
        raise ConfigError(f"{shown}: [aws] {missing} is missing (the other key is set)")
    region = options.get("region") or options.get("default_region") or DEFAULT_REGION
    environment = {"AWS_DEFAULT_REGION": region}
    if key_id is not None and secret is not None:
        environment["AWS_ACCESS_KEY_ID"] = key_id
        environment["AWS_SECRET_ACCESS_KEY"] = secret
        if "session_token" in options:
            environment["AWS_SESSION_TOKEN"] = options["session_token"]
    return S3Storage(
        url=shown,
        bucket=parsed.netloc,
        prefix=prefix,
        endpoint=endpoint,
        region=region,
        environment=environment,
        ignored_options=tuple(ignored),
    )


def _endpoint_shown(endpoint: str) -> str:
    """An endpoint URL without any user information it may carry."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


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
    expanded: dict[str, dict[str, str]] = {}
    for name in FREE_FORM_TABLES:
        table = document.get(name, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ConfigError(f"[{name}] values must all be strings")
        # Fails on an unset variable, as in ZeroFS.
        expanded[name] = {
            key: expand_variables(value, environ, f"{name}.{key}") for key, value in table.items()
        }

    cache_dir = Path(expand_variables(document["cache"]["dir"], environ, "cache.dir"))
    url = expand_variables(document["storage"]["url"], environ, "storage.url")
    # The password is not used (nothing is encrypted here) but must resolve, as in ZeroFS.
    expand_variables(
        document["storage"]["encryption_password"], environ, "storage.encryption_password"
    )
    sockets = {}
    for name in ("nbd", "ninep", "rpc"):
        table = document["servers"].get(name, {})
        if table.get("addresses"):
            raise ConfigError(
                f"servers.{name}.addresses: the stand-in serves only unix sockets "
                "(ZeroFS's NBD server has no authentication: keep it off the network)"
            )
        if "unix_socket" not in table:
            if name == "rpc":  # the admin service is optional, as in ZeroFS
                continue
            raise ConfigError(f"servers.{name}.unix_socket is required by the stand-in")
        where = f"servers.{name}.unix_socket"
        sockets[name] = Path(expand_variables(table["unix_socket"], environ, where))
        if not sockets[name].is_absolute():
            raise ConfigError(f"{where} must be an absolute path")
    if len(set(sockets.values())) != len(sockets):
        raise ConfigError("the NBD, 9P and RPC unix sockets must be different paths")
    if storage_scheme(url) in S3_SCHEMES:
        s3 = s3_storage(url, expanded["aws"], environ)
        # The 9P tree is local: only the exports' sizes and blocks are kept in S3.
        storage_dir = cache_dir / "standin-9p"
    else:
        s3 = None
        storage_dir = storage_directory(url)
    lsm = document.get("lsm", {})
    return StandinConfig(
        storage_dir=storage_dir,
        cache_dir=cache_dir,
        nbd_socket=sockets["nbd"],
        ninep_socket=sockets["ninep"],
        s3=s3,
        rpc_socket=sockets.get("rpc"),
        sync_writes=lsm.get("sync_writes", False),
        flush_interval_s=max(
            lsm.get("flush_interval_secs", DEFAULT_FLUSH_INTERVAL_S), MIN_FLUSH_INTERVAL_S
        ),
    )


# ---------------------------------------------------------------------------------
# Exports and their S3 layout


# ---------------------------------------------------------------------------------
# Fencing: one writer per volume, as ZeroFS's fencing makes it


# A writable server claims the volume's file:// storage at start by writing a token of
# its own here; ZeroFS's writer does the same with its manifest's epoch. A server that
# finds another token in the file has been superseded by a newer writer and exits 1
# with ZeroFS's words (its SlateDB error's message), within FENCE_CHECK_S: ZeroFS learns
# it at its next write to the store, an idle ZeroFS only then.
WRITER_FILE = ".standin-writer"
FENCE_CHECK_S = 1.0
FENCED_MESSAGE = (
    "another writer opened this volume's storage since this server started "
    f"({WRITER_FILE} changed). Fatal write error, exiting: Closed error: detected newer "
    "DB client"
)


def claim_writer(storage_dir: Path) -> str:
    """Make this server the volume's writer; returns its token."""
    token = f"{uuid.uuid4()} pid {os.getpid()}"
    staged = storage_dir / f"{WRITER_FILE}.{os.getpid()}"
    staged.write_text(token)
    os.replace(staged, storage_dir / WRITER_FILE)
    return token


def superseded(storage_dir: Path, token: str) -> bool:
    """Whether another server claimed the storage after the one holding ``token``."""
    try:
        return (storage_dir / WRITER_FILE).read_text() != token
    except FileNotFoundError:
        return False  # the volume's data deleted under the server: not another writer


def check_export_name(name: str) -> None:
    """An export is one file of .nbd/: raise ValueError for any other name."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not an export name: {name!r}")


def list_export_files(tree: Path) -> list[str]:
    """The exports of a served tree: the regular files of its .nbd/ directory."""
    try:
        entries = list((tree / EXPORT_DIRECTORY).iterdir())
    except FileNotFoundError:
        return []
    return sorted(entry.name for entry in entries if entry.is_file())


@dataclass(frozen=True)
class S3Layout:
    """Where a volume's exports live in its bucket, all under ``prefix/``:
    ``.nbd/<name>`` holds the export's size in decimal bytes, ``.nbd-blocks/<name>/``
    its blocks as the S3 plugin writes them (``<16 hex digits>``: the block number)."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def size_key(self, name: str) -> str:
        return self.key(EXPORT_DIRECTORY, name)

    def blocks_key(self, name: str) -> str:
        return self.key(BLOCKS_DIRECTORY, name)

    def read_size(self, client: Any, name: str) -> int | None:
        """The recorded size of an export, None when it has no record."""
        try:
            body = client.get_object(Bucket=self.bucket, Key=self.size_key(name))["Body"]
        except client.exceptions.NoSuchKey:
            return None
        with contextlib.closing(body):
            text = body.read().decode("ascii", errors="replace")
        if not text.isdigit():
            raise ConfigError(f"s3://{self.bucket}/{self.size_key(name)} holds no size")
        return int(text)

    def write_size(self, client: Any, name: str, size: int) -> None:
        client.put_object(Bucket=self.bucket, Key=self.size_key(name), Body=str(size).encode())

    def recorded_sizes(self, client: Any) -> dict[str, int]:
        """Every export recorded under the prefix, with its size."""
        directory = self.key(EXPORT_DIRECTORY) + "/"
        names = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=directory
        ):
            for entry in page.get("Contents", []):
                name = entry["Key"][len(directory) :]
                with contextlib.suppress(ValueError):
                    check_export_name(name)
                    names.append(name)
        sizes = {name: self.read_size(client, name) for name in names}
        return {name: size for name, size in sizes.items() if size is not None}


def s3_client(
    endpoint: str | None, environment: Mapping[str, str], *, timeout: float | None = None
) -> Any:
    """A boto3 S3 client with path-style addressing (object_store's default) and the
    credentials and region of ``environment``'s AWS_* variables. ``timeout`` bounds
    each connect and read and allows one retry; without it boto3's defaults apply."""
    try:
        import boto3
        import botocore.config
    except ImportError:
        raise ConfigError("boto3 is missing: install the Debian package python3-boto3") from None
    options: dict[str, Any] = {
        "region_name": environment.get("AWS_DEFAULT_REGION", DEFAULT_REGION),
        "s3": {"addressing_style": "path"},
    }
    if timeout is not None:
        options.update(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 2, "mode": "standard"},
        )
    # boto3's default session, whose loaded S3 model the S3 plugin's clients reuse.
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=environment.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=environment.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=environment.get("AWS_SESSION_TOKEN"),
        config=botocore.config.Config(**options),
    )


def s3_failure(url: str, bucket: str, endpoint: str | None, exc: Exception) -> str | None:
    """What went wrong reaching the storage ``url``, in words naming it and never a
    secret (the exception's own text is not used: it may quote a request); None for an
    exception that is not about S3."""
    if isinstance(exc, ConfigError):
        return str(exc)
    import botocore.exceptions  # present: the exception came from boto3

    shown = _endpoint_shown(endpoint) if endpoint else "of AWS"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return (
            f"{url}: no S3 credentials: set [aws] access_key_id and secret_access_key "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        if code == "NoSuchBucket":
            return f"{url}: the bucket {bucket} does not exist"
        refused = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
        if code in refused or status in (401, 403):
            return (
                f"{url}: S3 refused the credentials ({code or f'HTTP {status}'}) at the "
                f"endpoint {shown}"
            )
        return f"{url}: S3 answered {code or 'an error'} (HTTP {status})"
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f"{url}: cannot reach the S3 endpoint {shown} ({type(exc).__name__})"
    return None


def restore_exports(client: Any, layout: S3Layout, tree: Path) -> dict[str, int]:
    """Make the tree's .nbd/ exactly the exports recorded in S3, at their sizes.

    S3 is the truth: a file with no record was created over 9P but never connected to,
    so it holds nothing; a tree lost with its host comes back. Raises what the S3
    client raises when S3 cannot be read (see ``s3_failure``).
    """
    sizes = layout.recorded_sizes(client)
    exports = tree / EXPORT_DIRECTORY
    exports.mkdir(parents=True, exist_ok=True)
    for name in list_export_files(tree):
        if name not in sizes:
            (exports / name).unlink()
    for name, size in sizes.items():
        with (exports / name).open("ab") as export:
            export.truncate(size)
    return sizes


# ---------------------------------------------------------------------------------
# Write-back of s3:// exports


# The write-back area of one life of a writable s3:// server is
# <[cache] dir>/write-back/<life>/<export>/<block>: each file is an object written since
# it was last stored, as it is to be stored (object-size bytes), or empty for an object
# to delete (trimmed or zeroed whole). A file is replaced whole, written beside it under
# another name (<block>.new) and renamed, so that whenever nbdkit is stopped or killed
# each file is an answered state of its object.
_BLOCK_NAME = re.compile(r"[0-9a-f]{16}")


def block_name(number: int) -> str:
    """The name of an export's block, as the S3 plugin names its object."""
    return f"{number:016x}"


def discard_write_back(cache_dir: Path) -> int:
    """Remove the write-back areas of earlier lives without storing them (what they hold
    was never flushed: lost with the server that answered it, as ZeroFS loses its
    memtable); returns the number of objects discarded."""
    discarded = 0
    with contextlib.suppress(FileNotFoundError):
        for life in (cache_dir / WRITE_BACK_DIRECTORY).iterdir():
            discarded += len(dirty_objects(life))
            shutil.rmtree(life)
    return discarded


def new_write_back(cache_dir: Path) -> Path:
    """A write-back area for this life of the server."""
    area = cache_dir / WRITE_BACK_DIRECTORY / uuid.uuid4().hex
    area.mkdir(parents=True)
    return area


def dirty_objects(area: Path, export: str | None = None) -> list[Path]:
    """The dirty objects of a write-back area, or of one of its exports."""
    directories = [area / export] if export is not None else area.iterdir()
    found = []
    for directory in directories:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            found += [p for p in directory.iterdir() if _BLOCK_NAME.fullmatch(p.name)]
    return found


def store_dirty_objects(
    client: Any,
    layout: S3Layout,
    objects: Iterable[Path],
    guard: Callable[[Path], contextlib.AbstractContextManager[object]] | None = None,
) -> None:
    """Store each dirty object where the S3 plugin keeps it (PUT, or DELETE for an empty
    file), then remove its file: a flush. ``guard`` is held around each object's, so
    that no write replaces the file between its reading and its removal; without it,
    nothing may write (nbdkit is stopped or dead). Raises the first S3 failure, leaving
    the objects not stored dirty."""

    def store(path: Path) -> None:
        with guard(path) if guard is not None else contextlib.nullcontext():
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                return  # stored meanwhile by another flush
            key = f"{layout.blocks_key(path.parent.name)}/{path.name}"
            if content:
                client.put_object(Bucket=layout.bucket, Key=key, Body=content)
            else:
                client.delete_object(Bucket=layout.bucket, Key=key)
            path.unlink(missing_ok=True)

    objects = list(objects)
    if objects:
        with ThreadPoolExecutor(min(STORE_WORKERS, len(objects))) as pool:
            list(pool.map(store, objects))


class S3Checkpoints:
    """The checkpoints of an s3:// volume, inside its prefix so that deleting the prefix
    deletes them: ``.checkpoints/<id>/`` holds a server-side copy of the exports' size
    records and blocks (``.nbd/``, ``.nbd-blocks/``), taken with nbdkit stopped (``pause``)
    after storing the dirty objects of ``write_back`` (the server's write-back area, None
    when it has none), and ``checkpoint.json``, written last: a checkpoint without it is
    unfinished and not listed. Its layout is the volume's one level down, so ``run
    --checkpoint`` serves it with the same S3 plugin. Same interface as
    ``zerofs_standin_admin.FileCheckpoints``.
    """

    def __init__(
        self, client: Any, layout: S3Layout, pause: Any, write_back: Path | None = None
    ) -> None:
        self._client = client
        self._layout = layout
        self._pause = pause
        self._write_back = write_back
        self._root = layout.key(admin.CHECKPOINT_DIRECTORY)
        self._lock = threading.Lock()

    def layout_of(self, checkpoint: admin.Checkpoint) -> S3Layout:
        return S3Layout(self._layout.bucket, f"{self._root}/{checkpoint.id}")

    def _keys(self, prefix: str) -> list[str]:
        keys = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._layout.bucket, Prefix=prefix
        ):
            keys += [entry["Key"] for entry in page.get("Contents", [])]
        return keys

    def list(self) -> list[admin.Checkpoint]:
        found = []
        for key in self._keys(self._root + "/"):
            if not key.endswith(f"/{admin.CHECKPOINT_INFO}"):
                continue
            body = self._client.get_object(Bucket=self._layout.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                checkpoint = admin.parse_info(body.read())
            if checkpoint is not None:
                found.append(checkpoint)
        return sorted(found, key=lambda c: (c.created_at, c.name))

    def find(self, name: str) -> admin.Checkpoint | None:
        name = name.strip()
        return next((c for c in self.list() if c.name == name), None)

    def flush(self) -> None:
        """Store every answered write in S3 (without a write-back area, each was stored
        before it was answered)."""
        if self._write_back is not None:
            with self._pause():
                self._store_dirty_objects()

    def _store_dirty_objects(self) -> None:
        # Called with nbdkit stopped: no write can change a file while it is stored.
        if self._write_back is not None:
            store_dirty_objects(self._client, self._layout, dirty_objects(self._write_back))

    def create(self, name: str) -> admin.Checkpoint:
        name = name.strip()
        if not name:
            raise admin.CheckpointError("the checkpoint name is empty")
        with self._lock:
            if self.find(name) is not None:
                raise admin.CheckpointError(f"a checkpoint named {name!r} exists already")
            checkpoint = admin.Checkpoint(str(uuid.uuid4()), name, int(time.time()))
            target = self.layout_of(checkpoint)
            try:
                with self._pause():
                    self._store_dirty_objects()
                    for directory in (EXPORT_DIRECTORY, BLOCKS_DIRECTORY):
                        source_prefix = self._layout.key(directory) + "/"
                        for key in self._keys(source_prefix):
                            self._client.copy_object(
                                Bucket=self._layout.bucket,
                                Key=target.key(directory, key[len(source_prefix) :]),
                                CopySource={"Bucket": self._layout.bucket, "Key": key},
                            )
                info = {"id": checkpoint.id, "name": name, "created_at": checkpoint.created_at}
                self._client.put_object(
                    Bucket=self._layout.bucket,
                    Key=target.key(admin.CHECKPOINT_INFO),
                    Body=json.dumps(info).encode(),
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    self._delete_objects(target.key() + "/")
                raise
        return checkpoint

    def delete(self, name: str) -> None:
        with self._lock:
            checkpoint = self.find(name)
            if checkpoint is None:
                raise admin.CheckpointNotFound(f"no checkpoint is named {name.strip()!r}")
            target = self.layout_of(checkpoint)
            # Its record first: from then on it is not listed, whatever is left of it.
            self._client.delete_object(
                Bucket=self._layout.bucket, Key=target.key(admin.CHECKPOINT_INFO)
            )
            self._delete_objects(target.key() + "/")

    def _delete_objects(self, prefix: str) -> None:
        keys = self._keys(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self._client.delete_objects(
                Bucket=self._layout.bucket, Delete={"Objects": batch, "Quiet": True}
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
# listening for many seconds, and on s3:// storage nbdkit imports boto3 and checks the
# bucket first (minutes under emulation); the driver's own ready timeout bounds the start.
DIOD_START_TIMEOUT_S = 120.0
NBDKIT_START_TIMEOUT_S = 600.0
# A read-only export fails every write as ZeroFS 2.3's does (EIO), offered writable.
# (ZeroFS fails its flushes too; Debian's nbdkit 1.32 error filter cannot.)
READ_ONLY_ERRORS = [
    "error=EIO",
    "error-pwrite-rate=100%",
    "error-trim-rate=100%",
    "error-zero-rate=100%",
]


def _wait_for_socket(
    path: Path, process: subprocess.Popen[bytes], timeout: float, name: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if process.poll() is not None:
            raise ConfigError(f"{name} exited with status {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise ConfigError(f"{name} did not listen on {path} within {timeout:g}s")
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


# nbdkit's python plugin runs this file for s3:// storage.
S3_PLUGIN_SCRIPT = Path(__file__).resolve().parent / "zerofs_standin_s3.py"
# botocore reads path-style addressing (object_store's default) only from a config file.
AWS_CONFIG = "[default]\ns3 =\n    addressing_style = path\n"


def _nbdkit_plugin_directory(nbdkit: str) -> Path:
    dump = subprocess.run(
        [nbdkit, "--dump-config"], capture_output=True, text=True, timeout=30, check=False
    )
    for line in dump.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "plugindir":
            return Path(value)
    raise ConfigError(f"{nbdkit} --dump-config names no plugindir")


def _nbdkit_s3_plugin(
    nbdkit: str,
    storage: S3Storage,
    layout: S3Layout,
    tree: Path,
    error_file: Path,
    immutable: bool,
    write_back: Path | None,
    flush_interval_s: int,
) -> list[str]:
    """nbdkit's plugin arguments serving the tree's exports from S3 where ``layout`` says
    (no secret); the plugin writes why it could not start to ``error_file``. An
    ``immutable`` layout (a checkpoint's) never changes while it is served. With a
    ``write_back`` area, writes are stored at flushes, one every ``flush_interval_s``
    at least; without, before they are answered."""
    plugins = _nbdkit_plugin_directory(nbdkit)
    s3_plugin = plugins / "nbdkit-S3-plugin"
    if not (plugins / "nbdkit-python-plugin.so").exists() or not s3_plugin.exists():
        raise ConfigError(
            "nbdkit's python and S3 plugins are missing: install the Debian packages "
            "nbdkit-plugin-python and python3-boto3"
        )
    argv = ["python", str(S3_PLUGIN_SCRIPT), f"root={tree}", f"s3-plugin={s3_plugin}"]
    argv += [f"bucket={layout.bucket}", f"prefix={layout.prefix}", f"url={storage.url}"]
    argv += [f"object-size={OBJECT_SIZE}", f"failure-file={error_file}"]
    if storage.endpoint is not None:
        argv.append(f"endpoint-url={storage.endpoint}")
    if immutable:
        argv.append("immutable=true")
    if write_back is not None:
        argv += [f"write-back={write_back}", f"flush-interval={flush_interval_s}"]
    return argv


Checkpoints = admin.FileCheckpoints | S3Checkpoints


def checkpoint_store(config: StandinConfig, pause: Any, write_back: Path | None) -> Checkpoints:
    """The volume's checkpoints; ``pause`` holds the NBD server's writes back, and
    ``write_back`` is its write-back area (None without one)."""
    if config.s3 is None:
        return admin.FileCheckpoints(config.storage_dir, pause)
    try:
        client = s3_client(config.s3.endpoint, config.s3.environment, timeout=S3_CHECK_TIMEOUT_S)
    except Exception as exc:
        reason = s3_failure(config.s3.url, config.s3.bucket, config.s3.endpoint, exc)
        raise ConfigError(reason or str(exc)) from None
    return S3Checkpoints(client, config.s3.layout, pause, write_back)


def served_tree(
    config: StandinConfig, read_only: bool, checkpoint: str | None, store: Checkpoints | None
) -> tuple[Path, S3Layout | None]:
    """The tree to serve over 9P, whose ``.nbd/`` files are the NBD exports, and for
    s3:// storage where the exports' blocks are: the volume's, or a checkpoint's
    (ConfigError when no checkpoint has that name). On s3:// a read-only server keeps a
    tree of its own, rebuilt from S3 at start as the writer's is."""
    if checkpoint is not None:
        assert store is not None
        try:
            found = store.find(checkpoint)
        except Exception as exc:
            assert config.s3 is not None  # a file:// store raises nothing but OSError
            reason = s3_failure(config.s3.url, config.s3.bucket, config.s3.endpoint, exc)
            raise ConfigError(reason or str(exc)) from None
        if found is None:
            raise ConfigError(f"no checkpoint is named {checkpoint.strip()!r}")
        if isinstance(store, admin.FileCheckpoints):
            return store.exports(found), None
        tree = config.cache_dir / f"standin-9p-checkpoint-{found.id}"
        (tree / EXPORT_DIRECTORY).mkdir(parents=True, exist_ok=True)
        return tree, store.layout_of(found)
    if config.s3 is None:
        if not read_only:
            (config.storage_dir / EXPORT_DIRECTORY).mkdir(parents=True, exist_ok=True)
        return config.storage_dir, None
    tree = config.cache_dir / "standin-9p-read-only" if read_only else config.storage_dir
    (tree / EXPORT_DIRECTORY).mkdir(parents=True, exist_ok=True)
    return tree, config.s3.layout


def serve(config: StandinConfig, *, read_only: bool = False, checkpoint: str | None = None) -> int:
    """Serve the volume until SIGTERM/SIGINT (status 0) or a server dies (status 1).
    ``read_only`` (``run --read-only``) serves the live volume read-only; ``checkpoint``
    (``run --checkpoint NAME``) serves the named checkpoint, read-only too."""
    read_only = read_only or checkpoint is not None
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    nbdkit = _find("nbdkit", "nbdkit")
    diod = _find("diod", "diod")
    sockets = [config.nbd_socket, config.ninep_socket]
    if config.rpc_socket is not None:
        sockets.append(config.rpc_socket)
    for path in sockets:
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
    nbdkit_env = dict(child_env)
    private_dir = Path(tempfile.mkdtemp(prefix="zerofs-standin-"))
    nbdkit_error = private_dir / "nbdkit-error"
    children: dict[str, subprocess.Popen[bytes]] = {}
    relay: NinePRelay | None = None
    admin_server: admin.BackgroundAdminServer | None = None
    write_back: Path | None = None
    status = 1

    @contextlib.contextmanager
    def nbd_paused() -> Iterator[None]:
        # SIGSTOP stops every thread of nbdkit once its system call returns: a write is
        # in the file whole or not at all until SIGCONT. On s3://, a write-back file is
        # replaced by a rename, so each is one state of its object; a PUT nbdkit was
        # sending is of the same state as the file it has not yet removed, and one of
        # a write-through server is of a write it has not answered: the checkpoint may
        # or may not hold that write.
        process = children.get("nbdkit")
        if process is None or process.poll() is not None:
            yield
            return
        os.kill(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(process.pid, signal.SIGCONT)

    try:
        if config.s3 is not None and not read_only:
            discarded = discard_write_back(config.cache_dir)
            if discarded:
                say(
                    f"discarded {discarded} objects written and never flushed before the "
                    "previous server died: those writes are lost, as ZeroFS loses them"
                )
            if not config.sync_writes:
                write_back = new_write_back(config.cache_dir)
        store = None
        if config.rpc_socket is not None or checkpoint is not None:
            store = checkpoint_store(config, nbd_paused, write_back)
        tree, layout = served_tree(config, read_only, checkpoint, store)
        writer_token = None
        if not read_only and config.s3 is None:
            writer_token = claim_writer(config.storage_dir)
        next_fence_check = time.monotonic() + FENCE_CHECK_S
        if config.rpc_socket is not None:
            admin_server = admin.BackgroundAdminServer(
                config.rpc_socket, store, read_only=read_only
            )
        nbd_plugin = ["file", f"dir={tree / EXPORT_DIRECTORY}"]
        served = f"file://{config.storage_dir}"
        if checkpoint is not None:
            served += f" at checkpoint {checkpoint.strip()!r}"
        if config.s3 is not None:
            assert layout is not None
            nbd_plugin = _nbdkit_s3_plugin(
                nbdkit,
                config.s3,
                layout,
                tree,
                nbdkit_error,
                immutable=checkpoint is not None,
                write_back=write_back,
                flush_interval_s=config.flush_interval_s,
            )
            served = config.s3.url
            if checkpoint is not None:
                served += f" at checkpoint {checkpoint.strip()!r}"
            if config.s3.ignored_options:
                say(
                    "ignoring S3 options the stand-in does not implement: "
                    + ", ".join(config.s3.ignored_options)
                )
            aws_config = private_dir / "aws-config"
            aws_config.write_text(AWS_CONFIG)
            # The S3 plugin's clients read credentials and region from here only: not
            # from files of the user the stand-in runs as, which ZeroFS does not read.
            nbdkit_env.update(config.s3.environment)
            # nbdkit's embedded Python takes its prefix from the first python3 on PATH:
            # a virtualenv's or pyenv's would replace the system's library (and its
            # boto3) with one built for another interpreter.
            nbdkit_env["PATH"] = f"{Path(nbdkit).parent}:/usr/bin:/bin"
            nbdkit_env["AWS_CONFIG_FILE"] = str(aws_config)
            nbdkit_env["AWS_SHARED_CREDENTIALS_FILE"] = str(private_dir / "no-credentials")
        private_socket = private_dir / "diod.sock"
        argv = [diod, "-f", "-n", "-e", str(tree)]
        argv += ["-l", str(private_socket), "-L", "stderr"]
        if read_only:
            argv += ["-o", "ro"]
        if os.geteuid() == 0:
            argv.append("-N")  # root serves each attaching uid, named in no user database
        else:
            # A non-root diod serves everyone as its own user, which it looks up by name
            # (ZeroFS's image names uid 1001): with -N it cannot, and refuses every attach.
            argv.append("-S")
        # diod raises its own core limit: a crash must dump in the private dir, not
        # in whatever directory the stand-in was started from.
        children["diod"] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=private_dir,
            preexec_fn=_die_with_parent,
        )
        _wait_for_socket(private_socket, children["diod"], DIOD_START_TIMEOUT_S, "diod")
        relay = NinePRelay(config.ninep_socket, private_socket, tree)
        # Last, so that the NBD socket answering means 9P is up too (the admin service
        # may come a moment later).
        children["nbdkit"] = subprocess.Popen(
            [
                nbdkit,
                "--foreground",
                "--no-sr",
                "--log=stderr",
                "--unix",
                str(config.nbd_socket),
                *(["--filter=error"] if read_only else []),
                *nbd_plugin,
                *(READ_ONLY_ERRORS if read_only else []),
            ],
            stdin=subprocess.DEVNULL,
            env=nbdkit_env,
            # SIGKILL with the stand-in, as one ZeroFS process dies. Not nbdkit's own
            # --exit-with-parent: it replaces this with SIGTERM, and a gracefully
            # stopping nbdkit keeps its listening socket open without accepting, for as
            # long as the kernel holds the dead connections, so a reconnect hangs on it.
            preexec_fn=_die_with_parent,
        )
        try:
            _wait_for_socket(
                config.nbd_socket, children["nbdkit"], NBDKIT_START_TIMEOUT_S, "nbdkit"
            )
        except ConfigError:
            if nbdkit_error.exists():
                raise ConfigError(nbdkit_error.read_text().strip()) from None
            raise
        say(
            f"serving {served}: NBD on {config.nbd_socket} "
            f"(nbdkit pid {children['nbdkit'].pid}), 9P2000.L on {config.ninep_socket} "
            f"(diod pid {children['diod'].pid})"
        )
        while True:
            for name, child in children.items():
                if child.poll() is not None:
                    say(f"{name} exited unexpectedly with status {child.returncode}")
                    return 1
            if admin_server is not None and admin_server.error is not None:
                say(admin_server.error)
                return 1
            if writer_token is not None and time.monotonic() >= next_fence_check:
                next_fence_check = time.monotonic() + FENCE_CHECK_S
                if superseded(config.storage_dir, writer_token):
                    say(f"ERROR {FENCED_MESSAGE}")
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
        # every write it acknowledged is already in the file, or on s3:// in S3 or in
        # the write-back area that the final flush below stores, as ZeroFS's graceful
        # shutdown does after cancelling its NBD sessions (docs/zerofs-compatibility.md).
        if "nbdkit" in children:
            children["nbdkit"].kill()
            children["nbdkit"].wait()
        if write_back is not None and status == 0:
            assert config.s3 is not None
            try:
                _final_flush(config.s3, write_back)
            except Exception as exc:
                reason = s3_failure(config.s3.url, config.s3.bucket, config.s3.endpoint, exc)
                say(f"the final flush failed, its writes are lost: {reason or exc}")
                status = 1
        if "diod" in children:
            _stop(children["diod"], "diod")
        if relay is not None:
            relay.close()
        if admin_server is not None:
            admin_server.close()
        for path in sockets:
            _remove_socket(path)
        shutil.rmtree(private_dir, ignore_errors=True)
    return status


def _final_flush(storage: S3Storage, write_back: Path) -> None:
    """Store the dirty objects of a server whose nbdkit is dead, and remove its area."""
    objects = dirty_objects(write_back)
    if objects:
        client = s3_client(storage.endpoint, storage.environment, timeout=S3_CHECK_TIMEOUT_S)
        store_dirty_objects(client, storage.layout, objects)
        say(f"final flush: {len(objects)} objects stored")
    shutil.rmtree(write_back)


def _admin_command(args: argparse.Namespace, config: StandinConfig) -> int:
    """``checkpoint create|list|delete|info`` and ``flush``: calls of the running
    server's admin service, as ZeroFS's CLI makes them."""
    if config.rpc_socket is None:
        say("the config has no [servers.rpc] unix_socket: the server has no admin service")
        return 1
    try:
        with admin.admin_client(config.rpc_socket) as client:
            if args.command == "flush":
                client.call("Flush")
                print("flushed")
            elif args.action == "create":
                made = client.call("CreateCheckpoint", name=args.name).checkpoint
                print(f"checkpoint {made.name!r} created: id {made.id}, at "
                      f"{admin.shown_time(made.created_at.seconds)}")  # fmt: skip
            elif args.action == "list":
                listed = client.call("ListCheckpoints").checkpoints
                if not listed:
                    print("no checkpoints")
                for entry in listed:
                    print(f"{entry.name}\t{entry.id}\t{admin.shown_time(entry.created_at.seconds)}")
            elif args.action == "delete":
                client.call("DeleteCheckpoint", name=args.name)
                print(f"checkpoint {args.name.strip()!r} deleted")
            else:
                try:
                    found = client.call("GetCheckpointInfo", name=args.name).checkpoint
                except admin.CheckpointNotFound:
                    # As ZeroFS's CLI: a missing checkpoint is an answer, not a failure.
                    print(f"no checkpoint is named {args.name.strip()!r}")
                    return 0
                print(f"name: {found.name}\nid: {found.id}\n"
                      f"created at: {admin.shown_time(found.created_at.seconds)}")  # fmt: skip
    except admin.CheckpointError as exc:
        say(str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve the volume described by a ZeroFS config")
    run.add_argument("-c", "--config", type=Path, required=True, help="ZeroFS TOML config")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true", help="serve the volume read-only")
    mode.add_argument("--checkpoint", metavar="NAME", help="serve a checkpoint (read-only)")
    checkpoint = commands.add_parser("checkpoint", help="the running server's checkpoints")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    for action, what in (
        ("create", "record a checkpoint named NAME (unique)"),
        ("list", "list the checkpoints"),
        ("delete", "delete the checkpoint named NAME"),
        ("info", "show the checkpoint named NAME"),
    ):
        command = actions.add_parser(action, help=what)
        command.add_argument("-c", "--config", type=Path, required=True, help="ZeroFS TOML config")
        if action != "list":
            command.add_argument("name", metavar="NAME")
    flush = commands.add_parser("flush", help="make the running server's writes durable")
    flush.add_argument("-c", "--config", type=Path, required=True, help="ZeroFS TOML config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 1
    if args.command != "run":
        return _admin_command(args, config)
    try:
        return serve(config, read_only=args.read_only, checkpoint=args.checkpoint)
    except ConfigError as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
