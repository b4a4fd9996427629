"""The job container of a checkpoint pod (``job_pods.checkpoint_job``): creates or
deletes a checkpoint of a volume staged nowhere through the volume's server running
beside it (``servers.checkpoint``: a flush first; nothing is mounted to freeze).

On success the termination log holds the checkpoint as JSON, ``{"id": ..., "name": ...,
"createdAt": <seconds>}`` (``{}`` after a delete), which the controller reads
(``job_program``).

    python -m zerofs_csi.servers.pods.checkpoint_job --sockets DIR --volume VOLUME \\
        (--create NAME | --delete NAME)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from zerofs_csi.servers.admin import AdminClient
from zerofs_csi.servers.checkpoint import delete_checkpoint, take_checkpoint
from zerofs_csi.servers.pods.job_program import (
    DEFAULT_WAIT_S,
    TERMINATION_LOG,
    run_job,
    sockets_in,
    wait_for_server,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="checkpoint_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", required=True, help="the volume server's socket dir")
    parser.add_argument("--volume", required=True)
    operation = parser.add_mutually_exclusive_group(required=True)
    operation.add_argument("--create", metavar="NAME")
    operation.add_argument("--delete", metavar="NAME")
    parser.add_argument("--wait-seconds", type=float, default=DEFAULT_WAIT_S)
    parser.add_argument("--termination-log", default=TERMINATION_LOG)
    args = parser.parse_args(argv)
    sockets = sockets_in(args.sockets)

    def job() -> str:
        what = f"server of volume {args.volume}"
        wait_for_server(sockets, what, time.monotonic() + args.wait_seconds, with_admin=True)
        with AdminClient(sockets.admin, what) as server:
            if args.delete is not None:
                delete_checkpoint(server, args.delete)
                return "{}"
            taken = take_checkpoint(server, args.volume, args.create, None)
        created_at = int(taken.created_at.timestamp())
        return json.dumps({"id": taken.id, "name": taken.name, "createdAt": created_at})

    return run_job(job, args.termination_log)


if __name__ == "__main__":
    sys.exit(main())
