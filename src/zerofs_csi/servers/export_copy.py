"""Filling a new volume's export from another server's: ``fill_export`` creates the
target export (through 9P) and copies the source's into it with nbdcopy (libnbd-bin, a
Debian package): sparse-aware (only the source's non-zero blocks are written into a
target that reads as zeroes), memory bounded by its requests in flight, and its progress
reported as it goes (``--progress=FD``, whose lines read ``N/100``). The restores of
both backends use it: the local one in the controller, the Kubernetes one in a restore
pod (``servers.pods.restore_copy``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zerofs_csi import errors
from zerofs_csi.servers import ninep

NBDCOPY = "nbdcopy"
COPY_TIMEOUT_S = 6 * 3600.0
_PROGRESS_LINE = re.compile(rb"^(\d{1,3})/100$")


def _ignore(percent: int) -> None:
    pass


@dataclass(frozen=True)
class ServedExport:
    """A volume's export as a running server serves it."""

    export: str  # the export's name: the volume id
    nbd: Path  # the server's NBD socket
    ninep: Path  # its 9P socket


def fill_export(
    source: ServedExport,
    target: ServedExport,
    capacity_bytes: int,
    progress: Callable[[int], None] = _ignore,
    timeout_s: float = COPY_TIMEOUT_S,
) -> None:
    """Create ``target``'s export at ``capacity_bytes`` and copy ``source``'s data into
    it. OutOfRange when the source is larger; a source that has no export (its volume
    was never staged) leaves the target all zeroes. The caller flushes the target."""
    try:
        source_size = ninep.export_size(source.ninep, source.export)
    except OSError as exc:
        raise errors.Internal(
            f"reading the size of export {source.export}: {exc.strerror}"
        ) from None
    if source_size is not None and source_size > capacity_bytes:
        raise errors.OutOfRange(
            f"the source holds {source_size} bytes, more than the {capacity_bytes} bytes asked for"
        )
    try:
        ninep.prepare_export(target.ninep, target.export, capacity_bytes)
    except OSError as exc:
        raise errors.Internal(
            f"creating the export of volume {target.export}: {exc.strerror}"
        ) from None
    if source_size:
        copy_export(source.nbd, source.export, target.nbd, target.export, progress, timeout_s)


def copy_export(
    source_socket: Path,
    source: str,
    target_socket: Path,
    target: str,
    progress: Callable[[int], None] = _ignore,
    timeout_s: float = COPY_TIMEOUT_S,
) -> None:
    """Copy the NBD export ``source`` into ``target``, which reads as zeroes, calling
    ``progress`` with the percentage done each time nbdcopy reports it. Internal with
    nbdcopy's message on failure, DeadlineExceeded past ``timeout_s``."""
    reader, writer = os.pipe()
    with contextlib.ExitStack() as stack:
        lines = stack.enter_context(os.fdopen(reader, "rb"))
        stderr = stack.enter_context(tempfile.TemporaryFile())
        argv = [
            NBDCOPY,
            "--destination-is-zero",
            "--flush",
            f"--progress={writer}",
            f"nbd+unix:///{source}?socket={source_socket}",
            f"nbd+unix:///{target}?socket={target_socket}",
        ]
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(writer,),
            )  # fmt: skip
        except FileNotFoundError:
            raise errors.FailedPrecondition(
                f"{NBDCOPY} is not installed: install the Debian package libnbd-bin"
            ) from None
        finally:
            os.close(writer)  # nbdcopy's copy is the one left: EOF once it exits
        # The progress lines end only when nbdcopy does; a copy past its time is killed.
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            process.kill()

        watchdog = threading.Timer(timeout_s, expire)
        watchdog.start()
        try:
            for line in lines:
                reported = _PROGRESS_LINE.match(line.strip())
                if reported:
                    progress(min(int(reported[1]), 100))
            returncode = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            watchdog.cancel()
        if timed_out.is_set():
            raise errors.DeadlineExceeded(
                f"copying export {source} into {target} took longer than {timeout_s:g}s"
            )
        if returncode != 0:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace").strip()[-2000:]
            raise errors.Internal(f"copying export {source} into {target} failed: {message}")
