"""The ZeroFS stand-in's checkpoints and its admin gRPC service (``zerofs.admin``).

ZeroFS 2.3 serves ``zerofs.admin.AdminService`` on ``[servers.rpc] unix_socket``; its
CLI's ``checkpoint create|list|delete|info`` and ``flush`` are clients of that service.
The stand-in does the same, with the same behaviour:

- CreateCheckpoint trims the name; an empty name, a name in use or a read-only server
  (``run --read-only`` or ``--checkpoint``) is an error (INTERNAL, as ZeroFS answers
  every failure of this call). It flushes first, then records the checkpoint: an id (a
  UUID), the name and the creation time in whole seconds.
- ListCheckpoints lists the named checkpoints; GetCheckpointInfo answers NOT_FOUND for
  an unknown name; DeleteCheckpoint of an unknown name is an error (INTERNAL).
- Flush makes every acknowledged write durable.

A checkpoint of file:// storage is a copy of the exports (``.nbd/``) taken at one
instant into ``.checkpoints/<id>/.nbd/`` of the volume's directory, so it goes with the
volume's data: ``cp --reflink=auto --sparse=always`` (copy-on-write extents where the
filesystem shares them, holes kept otherwise), with nbdkit stopped (SIGSTOP) for the
copy so that no write lands in the middle of it. Writes nbdkit acknowledged are in the
files already (its file plugin writes before it answers), so the copy holds every one of
them: crash-consistent, as ZeroFS's checkpoint of its flushed state. ``run --checkpoint
NAME`` serves that copy read-only. For s3:// storage see ``zerofs_standin.S3Checkpoints``:
a server-side copy of the export objects inside the volume's prefix.

The messages are built at run time from ``zerofs_standin_admin.pb``, the descriptor set
tools/gen_proto.py writes from the project's proto/zerofs_admin.proto: the stand-in runs
on Debian's python3-protobuf and python3-grpcio, imported only when the admin service is
configured or called.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPORT_DIRECTORY = ".nbd"
# Inside the volume's directory, beside the exports: deleting the volume's data deletes
# its checkpoints too. Entries starting with "." are being created or deleted.
CHECKPOINT_DIRECTORY = ".checkpoints"
CHECKPOINT_INFO = "checkpoint.json"
DESCRIPTOR_SET = Path(__file__).resolve().parent / "zerofs_standin_admin.pb"
SERVICE = "zerofs.admin.AdminService"
ADMIN_WORKERS = 4
# How long a CLI command waits for the server's admin socket to answer.
CLIENT_TIMEOUT_S = 600.0


class CheckpointError(Exception):
    """A checkpoint call that cannot be done; the message says why."""


class CheckpointNotFound(CheckpointError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    id: str
    name: str
    created_at: int  # seconds since the epoch


def parse_info(data: bytes) -> Checkpoint | None:
    """A checkpoint's ``checkpoint.json``; None when it is not one."""
    try:
        info = json.loads(data)
        return Checkpoint(str(info["id"]), str(info["name"]), int(info["created_at"]))
    except (ValueError, KeyError, TypeError):
        return None


class FileCheckpoints:
    """The checkpoints of a file:// volume whose directory is ``tree``.

    ``pause`` is a context manager that holds every write back while it is entered (the
    server stops its NBD process); without one, nothing is paused (no server runs).
    """

    def __init__(
        self, tree: Path, pause: Callable[[], contextlib.AbstractContextManager[None]] | None
    ) -> None:
        self.tree = tree
        self.root = tree / CHECKPOINT_DIRECTORY
        self._pause = pause
        self._lock = threading.Lock()

    def list(self) -> list[Checkpoint]:
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                checkpoint = parse_info((entry / CHECKPOINT_INFO).read_bytes())
                if checkpoint is not None:
                    found.append(checkpoint)
        return sorted(found, key=lambda c: (c.created_at, c.name))

    def find(self, name: str) -> Checkpoint | None:
        name = name.strip()
        return next((c for c in self.list() if c.name == name), None)

    def exports(self, checkpoint: Checkpoint) -> Path:
        """The directory holding the checkpoint's tree (its ``.nbd/`` exports)."""
        return self.root / checkpoint.id

    def flush(self) -> None:
        """fdatasync every export file: what nbdkit acknowledged reaches the disk."""
        exports = self.tree / EXPORT_DIRECTORY
        with contextlib.suppress(FileNotFoundError):
            for entry in exports.iterdir():
                if entry.is_file():
                    fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)

    def create(self, name: str) -> Checkpoint:
        name = name.strip()
        if not name:
            raise CheckpointError("the checkpoint name is empty")
        with self._lock:
            if self.find(name) is not None:
                raise CheckpointError(f"a checkpoint named {name!r} exists already")
            self.flush()
            checkpoint = Checkpoint(str(uuid.uuid4()), name, int(time.time()))
            self.root.mkdir(exist_ok=True)
            partial = self.root / f".new-{checkpoint.id}"
            partial.mkdir()
            try:
                with self._pause() if self._pause is not None else contextlib.nullcontext():
                    self._copy_exports(partial / EXPORT_DIRECTORY)
                info = {"id": checkpoint.id, "name": name, "created_at": checkpoint.created_at}
                (partial / CHECKPOINT_INFO).write_text(json.dumps(info))
                _sync_tree(partial)
                os.rename(partial, self.root / checkpoint.id)
                _sync_directory(self.root)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        return checkpoint

    def delete(self, name: str) -> None:
        name = name.strip()
        with self._lock:
            checkpoint = self.find(name)
            if checkpoint is None:
                raise CheckpointNotFound(f"no checkpoint is named {name!r}")
            doomed = self.root / f".deleting-{checkpoint.id}"
            os.rename(self.root / checkpoint.id, doomed)
            _sync_directory(self.root)
            shutil.rmtree(doomed)

    def _copy_exports(self, destination: Path) -> None:
        source = self.tree / EXPORT_DIRECTORY
        destination.mkdir()
        names = sorted(p.name for p in source.iterdir() if p.is_file()) if source.is_dir() else []
        if not names:
            return
        copied = subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", "--preserve=mode", "--",
             *[str(source / n) for n in names], str(destination)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if copied.returncode != 0:
            raise CheckpointError(f"copying the exports failed: {copied.stderr.strip()}")


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    for directory, _, files in os.walk(path):
        for name in files:
            fd = os.open(Path(directory) / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        _sync_directory(Path(directory))


# ---------------------------------------------------------------------------------
# The gRPC service


def _grpc() -> Any:
    try:
        import grpc
    except ImportError:
        raise CheckpointError(
            "the admin service needs gRPC: install the Debian packages python3-grpcio and "
            "python3-protobuf"
        ) from None
    return grpc


class AdminMessages:
    """The zerofs.admin message classes, from the descriptor set beside this file."""

    def __init__(self) -> None:
        _grpc()
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        make = getattr(message_factory, "GetMessageClass", None)
        if make is None:  # protobuf before 4.22
            make = message_factory.MessageFactory(pool).GetPrototype
        self._classes = {
            name: make(pool.FindMessageTypeByName(f"zerofs.admin.{name}"))
            for name in (
                "CheckpointInfo",
                "CreateCheckpointRequest",
                "CreateCheckpointResponse",
                "ListCheckpointsRequest",
                "ListCheckpointsResponse",
                "DeleteCheckpointRequest",
                "DeleteCheckpointResponse",
                "GetCheckpointInfoRequest",
                "GetCheckpointInfoResponse",
                "FlushRequest",
                "FlushResponse",
            )
        }

    def __getattr__(self, name: str) -> Any:
        try:
            return self._classes[name]
        except KeyError:
            raise AttributeError(name) from None

    def info(self, checkpoint: Checkpoint) -> Any:
        message = self.CheckpointInfo(id=checkpoint.id, name=checkpoint.name)
        message.created_at.seconds = checkpoint.created_at
        return message


# method -> (request, response)
METHODS = {
    "CreateCheckpoint": ("CreateCheckpointRequest", "CreateCheckpointResponse"),
    "ListCheckpoints": ("ListCheckpointsRequest", "ListCheckpointsResponse"),
    "DeleteCheckpoint": ("DeleteCheckpointRequest", "DeleteCheckpointResponse"),
    "GetCheckpointInfo": ("GetCheckpointInfoRequest", "GetCheckpointInfoResponse"),
    "Flush": ("FlushRequest", "FlushResponse"),
}


class AdminServer:
    """``zerofs.admin.AdminService`` on a unix socket, over ``checkpoints``.

    ``read_only``: the server was started with ``--read-only`` or ``--checkpoint``, and
    refuses to create checkpoints, as ZeroFS does. ``checkpoints`` is a
    ``FileCheckpoints`` or the stand-in's ``S3Checkpoints`` (same methods).
    """

    def __init__(self, socket_path: Path, checkpoints: Any, *, read_only: bool) -> None:
        grpc = _grpc()
        self._grpc = grpc
        self._messages = AdminMessages()
        self._checkpoints = checkpoints
        self._read_only = read_only
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                getattr(self, method),
                request_deserializer=getattr(self._messages, request).FromString,
                response_serializer=getattr(self._messages, response).SerializeToString,
            )
            for method, (request, response) in METHODS.items()
        }
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=ADMIN_WORKERS))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        if self._server.add_insecure_port(f"unix:{socket_path}") == 0:
            raise CheckpointError(f"cannot listen on {socket_path}")
        self._server.start()

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)

    def _fail(self, context: Any, what: str, exc: Exception) -> None:
        context.abort(self._grpc.StatusCode.INTERNAL, f"{what}: {exc}")

    def CreateCheckpoint(self, request: Any, context: Any) -> Any:
        store = self._checkpoints
        try:
            if self._read_only:
                raise CheckpointError(
                    "the server is read-only (--read-only or --checkpoint): start it "
                    "without either to create checkpoints"
                )
            checkpoint = store.create(request.name)
        except Exception as exc:  # the store's failures: OSError, S3's
            self._fail(context, "creating the checkpoint failed", exc)
        return self._messages.CreateCheckpointResponse(checkpoint=self._messages.info(checkpoint))

    def ListCheckpoints(self, request: Any, context: Any) -> Any:
        checkpoints = self._checkpoints.list()
        return self._messages.ListCheckpointsResponse(
            checkpoints=[self._messages.info(c) for c in checkpoints]
        )

    def DeleteCheckpoint(self, request: Any, context: Any) -> Any:
        store = self._checkpoints
        try:
            store.delete(request.name)
        except Exception as exc:
            self._fail(context, "deleting the checkpoint failed", exc)
        return self._messages.DeleteCheckpointResponse()

    def GetCheckpointInfo(self, request: Any, context: Any) -> Any:
        checkpoint = self._checkpoints.find(request.name)
        if checkpoint is None:
            context.abort(
                self._grpc.StatusCode.NOT_FOUND, f"no checkpoint is named {request.name.strip()!r}"
            )
        return self._messages.GetCheckpointInfoResponse(checkpoint=self._messages.info(checkpoint))

    def Flush(self, request: Any, context: Any) -> Any:
        if not self._read_only:
            try:
                self._checkpoints.flush()
            except Exception as exc:  # the store's failures: OSError, S3's
                self._fail(context, "flush failed", exc)
        return self._messages.FlushResponse()


class BackgroundAdminServer:
    """An ``AdminServer`` started on a thread of its own, so that the volume is served
    while gRPC loads: under an emulated CPU its import and start cost a second or two of
    every start, and NBD and 9P do not need it. Until it listens, ``rpc_socket`` does not
    exist, which the driver takes for a server not answering yet. ``error`` says why it
    could not start."""

    def __init__(self, socket_path: Path, checkpoints: Any, *, read_only: bool) -> None:
        self.error: str | None = None
        self._server: AdminServer | None = None
        self._thread = threading.Thread(
            target=self._start,
            args=(socket_path, checkpoints, read_only),
            name="admin-service",
            daemon=True,
        )
        self._thread.start()

    def _start(self, socket_path: Path, checkpoints: Any, read_only: bool) -> None:
        try:
            self._server = AdminServer(socket_path, checkpoints, read_only=read_only)
        except CheckpointError as exc:
            self.error = str(exc)
        except Exception as exc:  # gRPC's own start failures
            self.error = f"the admin service did not start: {exc}"

    def close(self) -> None:
        self._thread.join()
        if self._server is not None:
            self._server.close()


class AdminClient:
    """Calls the admin service of a running server on ``socket_path``, as ZeroFS's CLI."""

    def __init__(self, socket_path: Path) -> None:
        grpc = _grpc()
        self._grpc = grpc
        self.messages = AdminMessages()
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, **fields: Any) -> Any:
        """The response; raises CheckpointNotFound for NOT_FOUND and CheckpointError for
        any other failure, with the server's message."""
        request, response = METHODS[method]
        stub = self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=getattr(self.messages, request).SerializeToString,
            response_deserializer=getattr(self.messages, response).FromString,
        )
        try:
            return stub(
                getattr(self.messages, request)(**fields),
                timeout=CLIENT_TIMEOUT_S,
            )
        except self._grpc.RpcError as exc:
            if exc.code() == self._grpc.StatusCode.NOT_FOUND:
                raise CheckpointNotFound(exc.details()) from None
            if exc.code() == self._grpc.StatusCode.UNAVAILABLE:
                raise CheckpointError(
                    "cannot reach the server's admin socket: is the server running?"
                ) from None
            raise CheckpointError(exc.details()) from None


@contextlib.contextmanager
def admin_client(socket_path: Path) -> Iterator[AdminClient]:
    client = AdminClient(socket_path)
    try:
        yield client
    finally:
        client.close()


def shown_time(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
