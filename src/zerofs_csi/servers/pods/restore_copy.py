"""The copy container of a restore pod (``restore_pod``): fills the new volume's export
from the checkpoint's, then flushes the new volume's server.

Both servers run beside it in the pod (native sidecars) with their sockets in the
directories given, each holding ``nbd.sock``, ``9p.sock`` and ``rpc.sock`` as a volume's
socket directory does. It waits for both to answer, runs ``fill_export`` and prints
``progress N`` lines as the copy goes (the controller reads them from the pod's log).
A failure ends it with status 1 and ``CODE: message`` in the termination log, the
gRPC code the CreateVolume answers with (``errors.of_code``).

    python -m zerofs_csi.servers.pods.restore_copy --source DIR --source-export VOLUME \\
        --target DIR --target-export VOLUME --capacity-bytes N
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from zerofs_csi import errors
from zerofs_csi.host.unix_socket import accepts
from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.export_copy import ServedExport, fill_export

PROGRESS_PREFIX = "progress "
DEFAULT_WAIT_S = 600.0
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX = 4096
WAIT_POLL_S = 0.2


def progress_of(line: str) -> int | None:
    """The percentage a ``progress N`` line of this program's output reports."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    value = line[len(PROGRESS_PREFIX) :].strip()
    return int(value) if value.isdigit() and int(value) <= 100 else None


def _wait_for(sockets: ServerSockets, what: str, deadline: float, with_admin: bool) -> None:
    """Until the server in ``sockets`` answers (its admin service too when asked)."""
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


def restore(
    source: ServerSockets,
    source_export: str,
    target: ServerSockets,
    target_export: str,
    capacity_bytes: int,
    wait_s: float = DEFAULT_WAIT_S,
) -> None:
    """Wait for both servers, copy, flush the target. Errors carry their gRPC code."""
    deadline = time.monotonic() + wait_s
    _wait_for(source, "checkpoint's server", deadline, with_admin=False)
    _wait_for(target, "new volume's server", deadline, with_admin=True)

    def report(percent: int) -> None:
        print(f"{PROGRESS_PREFIX}{percent}", flush=True)

    fill_export(
        ServedExport(source_export, source.nbd, source.ninep),
        ServedExport(target_export, target.nbd, target.ninep),
        capacity_bytes,
        progress=report,
    )
    with AdminClient(target.admin, "new volume's server") as admin:
        admin.flush()
    report(100)


def _sockets(directory: str) -> ServerSockets:
    path = Path(directory)
    return ServerSockets.under(path.parent, path.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore_copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the checkpoint server's socket dir")
    parser.add_argument("--source-export", required=True)
    parser.add_argument("--target", required=True, help="the new volume server's socket dir")
    parser.add_argument("--target-export", required=True)
    parser.add_argument("--capacity-bytes", type=int, required=True)
    parser.add_argument("--wait-seconds", type=float, default=DEFAULT_WAIT_S)
    parser.add_argument("--termination-log", default="/dev/termination-log")
    args = parser.parse_args(argv)
    try:
        restore(
            _sockets(args.source),
            args.source_export,
            _sockets(args.target),
            args.target_export,
            args.capacity_bytes,
            args.wait_seconds,
        )
    except errors.CsiError as exc:
        message = f"{exc.code.name}: {exc.message}"
        print(message, file=sys.stderr, flush=True)
        try:
            Path(args.termination_log).write_bytes(message.encode()[:TERMINATION_MESSAGE_MAX])
        except OSError as log_error:
            print(f"cannot write {args.termination_log}: {log_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
