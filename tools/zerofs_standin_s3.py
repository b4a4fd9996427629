"""nbdkit Python plugin: the ZeroFS stand-in's NBD exports, their blocks in S3.

``tools/zerofs_standin.py`` runs it for ``s3://`` storage as ``nbdkit python
zerofs_standin_s3.py root=DIR s3-plugin=FILE bucket=B prefix=P url=URL object-size=N
failure-file=FILE [endpoint-url=URL]``. As with ZeroFS, each file of ``DIR/.nbd/`` is an
export named after it and sized by the file when a client connects; new files are served
without a restart. At start (``get_ready``) the bucket is checked and ``DIR/.nbd/`` made
the exports recorded in S3.

The blocks are read and written by nbdkit's own S3 plugin (nbdkit-S3-plugin(1), the
file named by ``s3-plugin``), one instance per export so that each has its own key:
objects of ``object-size`` bytes under ``<prefix>/.nbd-blocks/<name>/``, absent where
never written. Before serving a connection the export's size is recorded in the object
``<prefix>/.nbd/<name>``, from which the file is recreated at the next start.

Credentials and the region come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``) and path-style
addressing from ``AWS_CONFIG_FILE``: nothing secret is on nbdkit's command line.

With ``immutable=true`` (a checkpoint's blocks, which never change while served) the
blocks present are listed once per export, and a read that covers absent blocks only is
answered with zeroes without asking S3: ZeroFS reads absent blocks from its own index,
while a GET per absent object through boto3 made a restore's full read of a large,
mostly empty checkpoint take hours under emulation.
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import itertools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import nbdkit  # provided by nbdkit's python plugin to the scripts it runs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zerofs_standin import (  # noqa: E402
    EXPORT_DIRECTORY,
    S3_CHECK_TIMEOUT_S,
    S3Layout,
    check_export_name,
    list_export_files,
    restore_exports,
    s3_client,
    s3_failure,
    say,
)

API_VERSION = 2

_parameters: dict[str, str] = {}
_layout: S3Layout | None = None
_exports: dict[str, Export] = {}
_exports_lock = threading.Lock()
_instance_numbers = itertools.count()
_records_client: Any = None  # for the size records


def _load_s3_plugin(path: str) -> ModuleType:
    """A fresh instance of nbdkit's S3 plugin module: its configuration is global to the
    module, so every export gets a module of its own."""
    name = f"nbdkit_s3_plugin_{next(_instance_numbers)}"
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Export:
    """One export: its S3 plugin instance, shared by every connection to it (so that
    their read-modify-writes of one object take the same lock), and its size record."""

    def __init__(self, layout: S3Layout, name: str, object_size: int) -> None:
        self.name = name
        self.object_size = object_size
        self.blocks_key = layout.blocks_key(name)
        self.lock = threading.Lock()
        self.recorded: int | None = None
        self.record_read = False
        self.present: frozenset[int] | None = None  # of an immutable export, once listed
        self.s3_plugin = _load_s3_plugin(_parameters["s3-plugin"])
        settings = {
            "bucket": layout.bucket,
            "key": layout.blocks_key(name),
            "object-size": str(object_size),
            # The S3 plugin wants a size that is a multiple of its object size, and uses
            # it only to answer get_size, which this plugin answers from the file itself.
            "size": str(object_size),
        }
        if "endpoint-url" in _parameters:
            settings["endpoint-url"] = _parameters["endpoint-url"]
        for key, value in settings.items():
            self.s3_plugin.config(key, value)
        self.s3_plugin.config_complete()

    def present_blocks(self, client: Any) -> frozenset[int]:
        """The numbers of the blocks stored in S3, listed once: for immutable exports."""
        with self.lock:
            if self.present is None:
                prefix = f"{self.blocks_key}/"
                numbers = set()
                pages = client.get_paginator("list_objects_v2").paginate(
                    Bucket=_parameters["bucket"], Prefix=prefix
                )
                for page in pages:
                    for item in page.get("Contents", []):
                        numbers.add(int(item["Key"][len(prefix) :], 16))
                self.present = frozenset(numbers)
            return self.present

    def record(self, layout: S3Layout, size: int) -> None:
        """Store the export's size in S3 unless it is recorded already."""
        with self.lock:
            if not self.record_read:
                self.recorded = layout.read_size(_records_client, self.name)
                self.record_read = True
            if self.recorded != size:
                layout.write_size(_records_client, self.name, size)
                self.recorded = size


@dataclass
class Handle:
    export: Export
    server: Any  # the S3 plugin's per-connection object
    size: int
    present: frozenset[int] | None = None  # the blocks stored, when the export is immutable


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


REQUIRED = ("root", "s3-plugin", "bucket", "prefix", "url", "object-size", "failure-file")


def config(key: str, value: str) -> None:
    if key not in (*REQUIRED, "endpoint-url", "immutable"):
        raise RuntimeError(f"unknown parameter {key}")
    _parameters[key] = value


def config_complete() -> None:
    global _layout
    for key in REQUIRED:
        if key not in _parameters:
            raise RuntimeError(f"parameter {key} missing")
    _layout = S3Layout(_parameters["bucket"], _parameters["prefix"])


def get_ready() -> None:
    """Before nbdkit listens: check the bucket and make the tree's .nbd/ the exports
    recorded in S3. Importing boto3 and loading its S3 model take seconds on a slow
    machine (more than a client waits for its handshake) and are done once, here: the
    S3 plugin's connections make their clients from the same loaded session.

    When S3 cannot be used, the reason (naming the storage URL, never a secret) goes to
    the error file for the stand-in to report, and nbdkit exits 1 before listening.
    """
    global _records_client
    assert _layout is not None
    endpoint = _parameters.get("endpoint-url")
    try:
        _records_client = s3_client(endpoint, os.environ, timeout=S3_CHECK_TIMEOUT_S)
        sizes = restore_exports(_records_client, _layout, Path(_parameters["root"]))
    except Exception as exc:
        reason = s3_failure(_parameters["url"], _layout.bucket, endpoint, exc)
        if reason is None:
            raise
        Path(_parameters["failure-file"]).write_text(reason)
        # Not an exception: nbdkit would print its traceback, which says nothing more.
        os._exit(1)
    _load_s3_plugin(_parameters["s3-plugin"])
    say(f"{_parameters['url']}: {len(sizes)} exports recorded")


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    return list_export_files(Path(_parameters["root"]))


# Named as nbdkit's python plugin calls it.
def open(readonly: bool) -> Handle:
    assert _layout is not None
    name = nbdkit.export_name()
    try:
        check_export_name(name)
        status = os.stat(Path(_parameters["root"]) / EXPORT_DIRECTORY / name)
    except (ValueError, FileNotFoundError) as exc:
        # nbdkit answers NBD_OPT_GO with NBD_REP_ERR_UNKNOWN, as ZeroFS does.
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}") from exc
    with _exports_lock:
        export = _exports.get(name)
        if export is None:
            export = Export(_layout, name, nbdkit.parse_size(_parameters["object-size"]))
            _exports[name] = export
    if not readonly:  # a read-only server (--read-only, --checkpoint) writes nothing
        export.record(_layout, status.st_size)
    # The S3 plugin makes a boto3 client per connection from boto3's default session,
    # which must not make two at once.
    present = None
    if _parameters.get("immutable") == "true":
        present = export.present_blocks(_records_client)
    with _exports_lock:
        server = export.s3_plugin.open(readonly)
    return Handle(export, server, status.st_size, present)


def get_size(handle: Handle) -> int:
    return handle.size


def can_write(handle: Handle) -> bool:
    return True


def can_flush(handle: Handle) -> bool:
    return True


def can_fua(handle: Handle) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(handle: Handle) -> bool:
    # Every write is a PUT finished before its reply, and S3 reads after a PUT see it.
    return True


def can_trim(handle: Handle) -> bool:
    return True


def can_zero(handle: Handle) -> bool:
    return True


def can_fast_zero(handle: Handle) -> bool:
    return True


def is_rotational(handle: Handle) -> bool:
    return False


# The S3 plugin's own pread/pwrite/trim/zero callbacks turn an S3 timeout into a success
# (they set an errno and return); its server's methods raise, which nbdkit answers with
# an error reply. The same goes for every other S3 failure.
def pread(handle: Handle, buf: bytearray, offset: int, flags: int) -> None:
    if handle.present is not None and len(buf):
        size = handle.export.object_size
        blocks = range(offset // size, (offset + len(buf) - 1) // size + 1)
        if handle.present.isdisjoint(blocks):
            buf[:] = bytes(len(buf))
            return
    handle.server.pread(buf, offset, flags)


def pwrite(handle: Handle, buf: bytes, offset: int, flags: int) -> None:
    handle.server.pwrite(buf, offset, flags)


def trim(handle: Handle, count: int, offset: int, flags: int) -> None:
    handle.server.trim(count, offset, flags)


def zero(handle: Handle, count: int, offset: int, flags: int) -> None:
    # With MAY_TRIM the S3 plugin only deletes the objects the range covers whole and
    # leaves the partly covered ones as they were; without it, it zeroes those too.
    handle.server.zero(count, offset, flags & ~nbdkit.FLAG_MAY_TRIM)


def flush(handle: Handle, flags: int) -> None:
    # Nothing is buffered: each write was stored in S3 before it was answered.
    return None
