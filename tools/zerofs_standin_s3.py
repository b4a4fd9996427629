"""nbdkit Python plugin: the ZeroFS stand-in's NBD exports, their blocks in S3.

``tools/zerofs_standin.py`` runs it for ``s3://`` storage as ``nbdkit python
zerofs_standin_s3.py root=DIR s3-plugin=FILE bucket=B prefix=P url=URL object-size=N
failure-file=FILE [endpoint-url=URL] [immutable=true] [write-back=DIR
flush-interval=SECONDS]``. As with ZeroFS, each file of ``DIR/.nbd/`` is an export named
after it and sized by the file when a client connects; new files are served without a
restart. At start (``get_ready``) the bucket is checked and ``DIR/.nbd/`` made the
exports recorded in S3.

The blocks are read and written by nbdkit's own S3 plugin (nbdkit-S3-plugin(1), the
file named by ``s3-plugin``), one instance per export so that each has its own key:
objects of ``object-size`` bytes under ``<prefix>/.nbd-blocks/<name>/``, absent where
never written. Before serving a connection the export's size is recorded in the object
``<prefix>/.nbd/<name>``, from which the file is recreated at the next start.

With ``write-back`` (the server's write-back area: see "Write-back" in
zerofs_standin.py) a write is answered once it is in the area, as ZeroFS answers once
the data is in its memory, and stored in S3 at a flush: an NBD flush (the export's dirty
objects), a FUA write (its own), one every ``flush-interval`` seconds (all of them), and
the stand-in's at its graceful stop, with nbdkit killed. A read takes an object from the
area when it is there, else from S3; a write into part of an object reads it so and
writes it whole into the area. The objects stored are the S3 plugin's, whole objects
and deletions alike. Without ``write-back`` (``[lsm] sync_writes``, or a read-only
server) the S3 plugin stores each write before it is answered.

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
import time
from collections.abc import Iterator
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
    block_name,
    check_export_name,
    dirty_objects,
    list_export_files,
    restore_exports,
    s3_client,
    s3_failure,
    say,
    store_dirty_objects,
)

API_VERSION = 2
# Locks of an export's objects, each shared by the objects whose numbers are equal
# modulo their count: a write into the write-back area and the storing of an object
# take its lock, one at a time.
OBJECT_LOCKS = 64

_parameters: dict[str, str] = {}
_layout: S3Layout | None = None
_exports: dict[str, Export] = {}
_exports_lock = threading.Lock()
_instance_numbers = itertools.count()
_records_client: Any = None  # for the size records
_store_client: Any = None  # for the flushes of the write-back area


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
    """One export: its S3 plugin instance and object locks, shared by every connection
    to it (so that their read-modify-writes of one object take the same lock), its size
    record and its directory of the write-back area (None without one)."""

    def __init__(self, layout: S3Layout, name: str, object_size: int) -> None:
        self.name = name
        self.object_size = object_size
        self.blocks_key = layout.blocks_key(name)
        self.lock = threading.Lock()
        self.object_locks = tuple(threading.Lock() for _ in range(OBJECT_LOCKS))
        self.dirty: Path | None = None
        if "write-back" in _parameters:
            self.dirty = Path(_parameters["write-back"]) / name
            self.dirty.mkdir(exist_ok=True)
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

    def object_lock(self, block: int) -> threading.Lock:
        return self.object_locks[block % OBJECT_LOCKS]

    def dirty_object(self, block: int) -> Path:
        assert self.dirty is not None
        return self.dirty / block_name(block)

    def store(self, blocks: list[int] | None = None) -> None:
        """Store the dirty objects of ``blocks``, or all of them."""
        assert _layout is not None and self.dirty is not None
        if blocks is None:
            objects = dirty_objects(self.dirty.parent, self.name)
        else:
            objects = [self.dirty_object(block) for block in blocks]
        store_dirty_objects(
            _store_client, _layout, objects, lambda path: self.object_lock(int(path.name, 16))
        )

    def present_blocks(self, client: Any) -> frozenset[int]:
        """The numbers of the blocks stored in S3, listed once: for immutable exports."""
        with self.lock:
            if self.present is None:
                numbers: set[int] = set()
                for page in self.stored_pages(client):
                    numbers.update(page)
                self.present = frozenset(numbers)
            return self.present

    def stored_pages(self, client: Any, first: int = 0) -> Iterator[list[int]]:
        """The numbers of the blocks stored in S3 from ``first`` on, in ascending order,
        a listing's page at a time."""
        prefix = f"{self.blocks_key}/"
        listing = {"Bucket": _parameters["bucket"], "Prefix": prefix}
        if first > 0:
            listing["StartAfter"] = prefix + block_name(first - 1)
        for page in client.get_paginator("list_objects_v2").paginate(**listing):
            yield [int(item["Key"][len(prefix) :], 16) for item in page.get("Contents", [])]

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
OPTIONAL = ("endpoint-url", "immutable", "write-back", "flush-interval")


def config(key: str, value: str) -> None:
    if key not in (*REQUIRED, *OPTIONAL):
        raise RuntimeError(f"unknown parameter {key}")
    _parameters[key] = value


def config_complete() -> None:
    global _layout
    for key in REQUIRED:
        if key not in _parameters:
            raise RuntimeError(f"parameter {key} missing")
    if ("write-back" in _parameters) != ("flush-interval" in _parameters):
        raise RuntimeError("write-back and flush-interval go together")
    _layout = S3Layout(_parameters["bucket"], _parameters["prefix"])


def get_ready() -> None:
    """Before nbdkit listens: check the bucket and make the tree's .nbd/ the exports
    recorded in S3. Importing boto3 and loading its S3 model take seconds on a slow
    machine (more than a client waits for its handshake) and are done once, here: the
    S3 plugin's connections make their clients from the same loaded session.

    When S3 cannot be used, the reason (naming the storage URL, never a secret) goes to
    the error file for the stand-in to report, and nbdkit exits 1 before listening.
    """
    global _records_client, _store_client
    assert _layout is not None
    endpoint = _parameters.get("endpoint-url")
    try:
        _records_client = s3_client(endpoint, os.environ, timeout=S3_CHECK_TIMEOUT_S)
        _store_client = s3_client(endpoint, os.environ)
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


def after_fork() -> None:
    if "write-back" in _parameters:
        threading.Thread(target=_flush_periodically, name="periodic-flush", daemon=True).start()


def _flush_periodically() -> None:
    """ZeroFS's own flush, every flush_interval_secs; a failed one is tried again at the
    next."""
    interval = int(_parameters["flush-interval"])
    while True:
        time.sleep(interval)
        with _exports_lock:
            exports = list(_exports.values())
        for export in exports:
            try:
                export.store()
            except Exception as exc:
                reason = s3_failure(
                    _parameters["url"], _parameters["bucket"], _parameters.get("endpoint-url"), exc
                )
                say(f"the periodic flush of {export.name} failed: {reason or exc}")


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
    # Every connection of an export reads and writes the same write-back files, and a
    # flush on any stores them all; S3 reads after a PUT see it.
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
    export = handle.export
    if handle.present is not None and len(buf):
        blocks = (block for block, _, _ in _pieces(export, offset, len(buf)))
        if handle.present.isdisjoint(blocks):
            buf[:] = bytes(len(buf))
            return
    if export.dirty is None:
        handle.server.pread(buf, offset, flags)
        return
    view = memoryview(buf)
    for block, start, end in _pieces(export, offset, len(buf)):
        at = block * export.object_size + start - offset
        piece = view[at : at + end - start]
        try:
            fd = os.open(export.dirty_object(block), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            handle.server.pread(piece, offset + at, flags)
            continue
        try:
            # A dirty object is whole, or empty when it is to be deleted.
            piece[:] = os.pread(fd, end - start, start) or bytes(end - start)
        finally:
            os.close(fd)


def pwrite(handle: Handle, buf: bytes, offset: int, flags: int) -> None:
    export = handle.export
    if export.dirty is None:
        handle.server.pwrite(buf, offset, flags)
        return
    view = memoryview(buf)
    blocks = []
    for block, start, end in _pieces(export, offset, len(buf)):
        at = block * export.object_size + start - offset
        _write_dirty(handle, block, start, view[at : at + end - start])
        blocks.append(block)
    if flags & nbdkit.FLAG_FUA:
        export.store(blocks)


def trim(handle: Handle, count: int, offset: int, flags: int) -> None:
    export = handle.export
    if export.dirty is None:
        handle.server.trim(count, offset, flags)
        return
    # As the S3 plugin's trim: the objects covered whole are deleted, the others kept.
    whole = [
        b for b, start, end in _pieces(export, offset, count) if end - start == export.object_size
    ]
    _delete(handle, whole)
    if flags & nbdkit.FLAG_FUA:
        export.store(whole)


def zero(handle: Handle, count: int, offset: int, flags: int) -> None:
    # With MAY_TRIM the S3 plugin only deletes the objects the range covers whole and
    # leaves the partly covered ones as they were; without it, it zeroes those too.
    export = handle.export
    if export.dirty is None:
        handle.server.zero(count, offset, flags & ~nbdkit.FLAG_MAY_TRIM)
        return
    pieces = list(_pieces(export, offset, count))
    whole = [b for b, start, end in pieces if end - start == export.object_size]
    for block, start, end in pieces:
        if end - start < export.object_size:
            _write_dirty(handle, block, start, bytes(end - start))
    _delete(handle, whole)
    if flags & nbdkit.FLAG_FUA:
        export.store([block for block, _, _ in pieces])


def flush(handle: Handle, flags: int) -> None:
    if handle.export.dirty is not None:
        handle.export.store()


def _pieces(export: Export, offset: int, count: int) -> Iterator[tuple[int, int, int]]:
    """The objects a range covers: (object number, first byte, end) for each, the bytes
    counted from the object's start."""
    size = export.object_size
    for block in range(offset // size, (offset + count - 1) // size + 1 if count else 0):
        base = block * size
        yield block, max(offset - base, 0), min(offset + count - base, size)


def _write_dirty(handle: Handle, block: int, start: int, data: bytes | memoryview) -> None:
    """Write ``data`` into an object at ``start``, in the write-back area."""
    export = handle.export
    size = export.object_size
    path = export.dirty_object(block)
    with export.object_lock(block):
        if len(data) == size:
            content: bytes | bytearray | memoryview = data
        else:
            content = bytearray(size)
            try:
                content[:] = path.read_bytes() or bytes(size)
            except FileNotFoundError:
                handle.server.pread(content, block * size, 0)
            content[start : start + len(data)] = data
        _replace(path, content)


def _delete(handle: Handle, blocks: list[int]) -> None:
    """Delete whole objects, in the write-back area: those stored or dirty (the others
    read as zeroes already, as objects the S3 plugin never wrote)."""
    if not blocks:
        return
    export = handle.export
    assert export.dirty is not None
    first, last = blocks[0], blocks[-1]
    present = {int(p.name, 16) for p in dirty_objects(export.dirty.parent, export.name)}
    for numbers in export.stored_pages(_store_client, first):
        present.update(numbers)
        if numbers and numbers[-1] >= last:
            break
    for block in sorted(present):
        if first <= block <= last:
            with export.object_lock(block):
                _replace(export.dirty_object(block), b"")


def _replace(path: Path, content: bytes | bytearray | memoryview) -> None:
    """Replace a file whole: a reader, a flush or the stand-in stopping nbdkit sees its
    old content or its new one."""
    staged = path.with_name(path.name + ".new")
    with staged.open("wb") as file:
        file.write(content)
    os.replace(staged, path)
