"""Copying one server's NBD export into another's with nbdcopy (libnbd-bin, a Debian
package): sparse-aware (only the source's non-zero blocks are written into a target that
reads as zeroes), memory bounded by its requests in flight, and its progress reported as
it goes (``--progress=FD``, whose lines read ``N/100``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from zerofs_csi import errors

NBDCOPY = "nbdcopy"
COPY_TIMEOUT_S = 6 * 3600.0
_PROGRESS_LINE = re.compile(rb"^(\d{1,3})/100$")


def _ignore(percent: int) -> None:
    pass


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
