"""The job container of a restore pod (``job_pods.restore_job``): fills the new volume's
export from the checkpoint's, then flushes the new volume's server.

Both servers run beside it in the pod with their sockets in the directories given. It
waits for both to answer, runs ``fill_export`` and prints ``progress N`` lines as the
copy goes (the controller reads them from the pod's log); its outcome goes to the
termination log (``job_program``).

    python -m zerofs_csi.servers.pods.restore_copy --source DIR --source-export VOLUME \\
        --target DIR --target-export VOLUME --capacity-bytes N
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.export_copy import ServedExport, fill_export
from zerofs_csi.servers.pods.job_program import (
    DEFAULT_WAIT_S,
    TERMINATION_LOG,
    run_job,
    sockets_in,
    wait_for_server,
)

PROGRESS_PREFIX = "progress "


def progress_of(line: str) -> int | None:
    """The percentage a ``progress N`` line of this program's output reports."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    value = line[len(PROGRESS_PREFIX) :].strip()
    return int(value) if value.isdigit() and int(value) <= 100 else None


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
    wait_for_server(source, "checkpoint's server", deadline, with_admin=False)
    wait_for_server(target, "new volume's server", deadline, with_admin=True)

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restore_copy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the checkpoint server's socket dir")
    parser.add_argument("--source-export", required=True)
    parser.add_argument("--target", required=True, help="the new volume server's socket dir")
    parser.add_argument("--target-export", required=True)
    parser.add_argument("--capacity-bytes", type=int, required=True)
    parser.add_argument("--wait-seconds", type=float, default=DEFAULT_WAIT_S)
    parser.add_argument("--termination-log", default=TERMINATION_LOG)
    args = parser.parse_args(argv)

    def job() -> str:
        restore(
            sockets_in(args.source),
            args.source_export,
            sockets_in(args.target),
            args.target_export,
            args.capacity_bytes,
            args.wait_seconds,
        )
        return ""

    return run_job(job, args.termination_log)


if __name__ == "__main__":
    sys.exit(main())
