"""How an NBD device is set up in the kernel: its timeouts, block size and hardware
queues, and the checks of what an attach asks for.

Timeouts (the defaults, and why; read from drivers/block/nbd.c of 6.1):

* A request is never abandoned to a server that is alive. With ONE connection and
  NBD_ATTR_TIMEOUT = 0, the block layer's timeout only makes the kernel log "Possible
  stuck request" and restart the timer (nbd_xmit_timeout); it requeues the request only
  when RECONFIGURE has replaced the socket it was sent on. With more than one connection
  there is no such mode: every block-layer timeout (30 s when TIMEOUT is 0, see
  nbd_set_cmd_timeout) requeues the request and shuts its socket down, though the server
  may still execute it later (a stale write), and replies already queued on that socket
  are logged as "Suspicious reply". A very large TIMEOUT does not help either: a request
  in flight on a socket whose server died is resent only at its timeout (recv_work marks
  the socket dead and leaves its requests alone), so a server crash would stall the
  writer for that long. Hence ``DEFAULT_CONNECTIONS = 1``.
* ``REQUEUE_TICK_MS = 1000`` (the queue's ``io_timeout`` in sysfs, one connection only):
  how often the kernel looks at requests still in flight. After a server crash and the
  reconnect, the requests lost with the old socket are resent at the next tick: a crash
  costs the server's restart plus about a second. The block layer rounds timers up to
  whole seconds, so a smaller tick gains nothing.
* ``MULTI_CONN_IO_TIMEOUT_S = 30``: the kernel's own timeout when several connections are
  asked for (a StorageClass's choice): a crash stalls in-flight requests that long, and
  a server silent for that long has its requests requeued.
* ``dead_conn_timeout_s = 300`` (NBD_ATTR_DEAD_CONN_TIMEOUT): once no connection of a
  device is alive, new I/O waits this long for RECONFIGURE with fresh sockets before
  failing with EIO. It must cover a ZeroFS restart (process or pod, cache warm-up) and a
  node plugin restart in between: 300 s is the reattach window ceph-csi settled on
  (ceph-csi#2204, #2394). The link keeper reconnects within a second or two of the
  server accepting connections again.
* A server that is alive but answers nothing is the driver's business, not the
  kernel's: its supervisor probes it with a handshake and restarts it after a long,
  configurable window (``servers.local``); the dead connection then reconnects.
"""

from __future__ import annotations

import errno
import functools
import os

from zerofs_csi.nbd import _nbd
from zerofs_csi.nbd._nbd import NbdError
from zerofs_csi.nbd.limits import MAX_CONNECTIONS

MULTI_CONN_IO_TIMEOUT_S = 30
REQUEUE_TICK_MS = 1000
DEFAULT_DEAD_CONN_TIMEOUT_S = 300
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_READY_TIMEOUT_S = 10.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
# How long a DISCONNECT waits for udev's probe of the device to end (its reads would fail
# and log I/O errors once the connections go); past it, the disconnect goes ahead.
DISCONNECT_LOCK_TIMEOUT_S = 5.0
# The kernel accepts powers of two from 512 to PAGE_SIZE (4096 on x86-64 and arm64).
BLOCK_SIZES = (512, 1024, 2048, 4096)


def io_timeout_for(connections: int) -> int:
    """NBD_ATTR_TIMEOUT for a device of ``connections`` sockets: 0 (never abandon a
    request) where the kernel has that mode, one connection; see the module docstring."""
    return 0 if connections == 1 else MULTI_CONN_IO_TIMEOUT_S


def validate_attach(
    backend_id: str, connections: int, block_size: int, io_timeout_s: int, dead: int
) -> None:
    if not backend_id or "\0" in backend_id or "\n" in backend_id:
        raise ValueError(f"invalid backend id {backend_id!r}")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, got {connections}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
    if io_timeout_s < 0 or dead < 0:
        raise ValueError("timeouts must not be negative")


@functools.cache
def _possible_cpus() -> int:
    """nr_cpu_ids: the block layer gives a device at most this many hardware queues."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            ranges = f.read().strip()
        return max(int(r.split("-")[-1]) for r in ranges.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def hardware_queues_for(connections: int) -> int:
    """How many hardware queues the kernel gives a device connected with ``connections``
    sockets (one per connection, capped at the number of possible CPUs)."""
    return min(connections, _possible_cpus())


def block_size_for(requested: int, negotiated: _nbd.Negotiated) -> int:
    """The requested block size, raised to the server's minimum when it states one."""
    minimum = negotiated.min_block_size
    if minimum <= requested:
        return requested
    for size in BLOCK_SIZES:
        if size >= minimum:
            return size
    raise NbdError(
        errno.EINVAL,
        f"the server's minimum block size {minimum} exceeds what the kernel supports",
    )


# ZeroFS 2.3 answers a request longer than 128 MiB with EINVAL (a TRIM included), while
# the kernel sends a discard of up to 4 GiB to an NBD device at once (nbd_set_size sets
# max_discard_sectors to UINT_MAX at every connect and resize).
MAX_REQUEST_BYTES = 128 << 20


def limit_discards(index: int, max_bytes: int = MAX_REQUEST_BYTES) -> None:
    """Cap the discards of ``nbd<index>`` at ``max_bytes`` a request (the queue's
    ``discard_max_bytes``, which the block layer splits discards by). Only lowers it: 0
    (no TRIM) or a smaller limit stays."""
    path = f"/sys/block/nbd{index}/queue/discard_max_bytes"
    with open(path) as f:
        current = int(f.read())
    if current > max_bytes:
        with open(path, "w") as f:
            f.write(str(max_bytes))


def set_requeue_tick(index: int, tick_ms: int = REQUEUE_TICK_MS) -> None:
    """Have the kernel look at the requests of ``nbd<index>`` still in flight every
    ``tick_ms`` (the queue's io_timeout; with NBD_ATTR_TIMEOUT 0 and one connection a
    look only requeues what was sent on a socket RECONFIGURE has since replaced)."""
    with open(f"/sys/block/nbd{index}/queue/io_timeout", "w") as f:
        f.write(str(tick_ms))
