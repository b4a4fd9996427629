"""What every job container of a job pod (``job_pods``) does the same way: wait for the
pod's servers, and end with the job's outcome in the termination log, which the
controller reads from the pod's status: the result's text on success, ``CODE: message``
(``errors.of_code``) and status 1 on a failure."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from zerofs_csi import errors
from zerofs_csi.host.unix_socket import accepts
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets

DEFAULT_WAIT_S = 600.0
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX = 4096
TERMINATION_LOG = "/dev/termination-log"
WAIT_POLL_S = 0.2


def sockets_in(directory: str) -> ServerSockets:
    """A job server's sockets, laid out as a volume's socket directory."""
    path = Path(directory)
    return ServerSockets.under(path.parent, path.name)


def wait_for_server(sockets: ServerSockets, what: str, deadline: float, with_admin: bool) -> None:
    """Until the server in ``sockets`` answers (its admin service too when asked);
    Unavailable past ``deadline`` (monotonic)."""
    admin = AdminClient(sockets.admin, what) if with_admin else None
    try:
        while True:
            listening = accepts(sockets.nbd) and accepts(sockets.ninep)
            if listening and (admin is None or admin.answers(timeout=2.0)):
                return
            if time.monotonic() > deadline:
                raise errors.Unavailable(
                    f"the {what} did not answer on {sockets.directory} in time"
                )
            time.sleep(WAIT_POLL_S)
    finally:
        if admin is not None:
            admin.close()


def run_job(job: Callable[[], str], termination_log: str) -> int:
    """Run ``job``; its result (or the failure) goes to ``termination_log``."""
    try:
        outcome, status = job(), 0
    except errors.CsiError as exc:
        outcome, status = f"{exc.code.name}: {exc.message}", 1
        print(outcome, file=sys.stderr, flush=True)
    except Exception as exc:
        # A defect or the pod's environment (a permission, a missing file): the
        # controller is told what it was, the log keeps where.
        traceback.print_exc()
        outcome, status = f"INTERNAL: the job failed: {type(exc).__name__}: {exc}", 1
    try:
        Path(termination_log).write_bytes(outcome.encode()[:TERMINATION_MESSAGE_MAX])
    except OSError as log_error:
        print(f"cannot write {termination_log}: {log_error}", file=sys.stderr)
    return status
