"""What the regression, chaos and soak harnesses share.

The plugin, the CSI client and the node's outside view (connected NBD devices, server
processes, mounts) come from ``zerofs_csi.bench.plugin``, the harness the privileged
tests and the benchmarks use, so that these harnesses drive the plugin exactly as the
tests do.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from zerofs_csi.bench.plugin import PluginProcess, Volume
from zerofs_csi.bench.zerofs_server import ZeroFSServer, zerofs_server

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "s3"))

from minio_server import volume_store  # noqa: E402

RESULTS_DIR = REPO / "build" / "harness"
MiB = 1 << 20
# The harnesses kill servers under writers and count any I/O error as a failure: their
# volumes make each write durable before it is answered (see zerofs_csi.node.lost_writes).
SYNC_WRITES = {"syncWrites": "true"}
# Codes a CSI sidecar retries: the volume is busy (ABORTED) or the plugin is restarting
# (UNAVAILABLE). Anything else ends the run.
RETRYABLE = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
DEFAULT_RETRY_BOUND_S = 180.0

T = TypeVar("T")


@functools.cache
def server() -> ZeroFSServer:
    """The per-volume server of this run: ZeroFS when there is one, else the stand-in."""
    return zerofs_server()


def plugin_process(workdir: Path, **options: Any) -> PluginProcess:
    """The plugin with the run's per-volume server, as the privileged tests run it (on
    a MinIO bucket for ZeroFS, which refuses file://), unless ``s3`` says where."""
    s3 = options.pop("s3") if "s3" in options else volume_store(server())
    return PluginProcess(workdir, zerofs_command=server().command, s3=s3, cwd=REPO, **options)


def call_with_retry(
    what: str,
    rpc: Callable[[], T],
    bound_s: float = DEFAULT_RETRY_BOUND_S,
    retried: list[str] | None = None,
) -> T:
    """``rpc()``, retried on ABORTED and UNAVAILABLE for at most ``bound_s`` seconds, as
    the CO would; any other error (or running out of time) propagates."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            return rpc()
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code not in RETRYABLE or time.monotonic() > deadline:
                raise HarnessFailure(
                    f"{what}: {code.name}: {exc.details()}"  # type: ignore[attr-defined]
                ) from None
            if retried is not None:
                retried.append(f"{what}: {code.name}")
            time.sleep(0.5)


class HarnessFailure(Exception):
    """A check of the harness failed: the message says which and what was seen."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise HarnessFailure(message)


class Harness(Protocol):
    def run(self) -> None: ...

    def close(self) -> None: ...


def run_and_close(harness: Harness) -> str | None:
    """Run a harness and always close it; return why it failed, or None when it passed."""
    failure: str | None = None
    try:
        harness.run()
    except HarnessFailure as exc:
        failure = str(exc)
    except Exception as exc:  # any other error is a failed run too, reported the same way
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            harness.close()
        except Exception as exc:
            failure = failure or f"cleanup failed: {type(exc).__name__}: {exc}"
    return failure


def block(seed: int, name: str, index: int) -> bytes:
    """The MiB number ``index`` of the data file ``name``: random bytes, reproducible
    from the seed, so every written MiB can be checked without keeping a copy."""
    return random.Random(f"{seed}/{name}/{index}").randbytes(MiB)


def verify_file(path: Path, seed: int, name: str, mib: int) -> None:
    """Compare the first ``mib`` MiB of ``path`` with what was written."""
    with open(path, "rb") as f:
        for index in range(mib):
            got = f.read(MiB)
            if got != block(seed, name, index):
                raise HarnessFailure(
                    f"{path}: MiB {index} of {mib} differs from what was written and fsync'd"
                    + ("" if len(got) == MiB else f" (read {len(got)} bytes)")
                )


def kill_server(volume: Volume) -> int | None:
    """kill -9 of the volume server's whole process group, as a crash of ZeroFS (one
    process) drops every connection without a reply. Returns the killed pid."""
    pid = volume.server_pid()
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
    return pid


def write_results(name: str, results: dict[str, object], directory: Path = RESULTS_DIR) -> Path:
    """``results`` as ``<directory>/<name>.json``, with the server that ran them."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"server": asdict(server()), **results}, indent=2) + "\n")
    return path
