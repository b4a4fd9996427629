"""The arguments of the controller's calls that are checked before any state is touched:
volume and node ids, capacity ranges, the parameters that define a volume, and
ListVolumes' tokens. Each failure names the field (INVALID_ARGUMENT, OUT_OF_RANGE, or
ABORTED for a token this driver did not hand out)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from zerofs_csi.config import NODE_ID_RULE, node_id_fits
from zerofs_csi.csi import csi_pb2
from zerofs_csi.errors import Aborted, InvalidArgument, OutOfRange
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.settings import RESERVED_PREFIXES

GiB = 1 << 30
DEFAULT_CAPACITY_BYTES = 1 * GiB
# Sizes are whole 4 KiB blocks: the largest block size of the filesystems offered, and
# the NBD block size the node uses.
CAPACITY_ALIGNMENT = 4096
# capacity_bytes is an int64 on the wire (csi.proto, Volume.capacity_bytes).
MAX_CAPACITY_BYTES = (2**63 - 1) // CAPACITY_ALIGNMENT * CAPACITY_ALIGNMENT
# ListVolumes' next_token: this prefix and the last volume id of the page.
LIST_TOKEN_PREFIX = "after:"


def volume_id_argument(value: str, field: str = "volume_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return validate_volume_id(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc.message}") from None


def node_id_argument(value: str) -> str:
    if not value:
        raise InvalidArgument("node_id is required")
    if not node_id_fits(value):
        raise InvalidArgument(f"node_id {NODE_ID_RULE}")
    return value


def request_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters that define a volume, without the CO's own metadata keys."""
    return {k: v for k, v in parameters.items() if not k.startswith(RESERVED_PREFIXES)}


def _round_up(value: int) -> int:
    return -(-value // CAPACITY_ALIGNMENT) * CAPACITY_ALIGNMENT


def capacity_for(capacity_range: csi_pb2.CapacityRange | None) -> int:
    """The size to provision for a CreateVolume capacity range.

    No range (or neither bound): DEFAULT_CAPACITY_BYTES, or the largest whole number of
    blocks within the limit when the limit is smaller. Otherwise the required size
    rounded up to CAPACITY_ALIGNMENT, which must stay within the limit.
    """
    required = capacity_range.required_bytes if capacity_range is not None else 0
    limit = capacity_range.limit_bytes if capacity_range is not None else 0
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(
            f"capacity_range: required_bytes ({required}) is greater than limit_bytes ({limit})"
        )
    if required == 0:
        if limit == 0 or limit >= DEFAULT_CAPACITY_BYTES:
            return DEFAULT_CAPACITY_BYTES
        capacity = limit // CAPACITY_ALIGNMENT * CAPACITY_ALIGNMENT
        if capacity == 0:
            raise OutOfRange(
                f"capacity_range: limit_bytes ({limit}) is smaller than one "
                f"{CAPACITY_ALIGNMENT}-byte block"
            )
        return capacity
    capacity = _round_up(required)
    if capacity > MAX_CAPACITY_BYTES:
        raise OutOfRange(f"capacity_range: required_bytes ({required}) is too large")
    if limit and capacity > limit:
        raise OutOfRange(
            f"capacity_range: sizes are whole {CAPACITY_ALIGNMENT}-byte blocks, and "
            f"{required} bytes round up to {capacity}, above limit_bytes ({limit})"
        )
    return capacity


def capacity_fits(capacity: int, capacity_range: csi_pb2.CapacityRange | None) -> bool:
    if capacity_range is None:
        return True
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    return capacity >= required and (limit == 0 or capacity <= limit)


def listing_start(token: str) -> str:
    """The volume id a ListVolumes ``starting_token`` continues after.

    A token names the last volume of the previous page, so a page still continues
    where it ended when that volume is deleted meanwhile. Anything else did not come
    from this plugin, which the spec answers with ABORTED.
    """
    volume_id = token.removeprefix(LIST_TOKEN_PREFIX)
    if volume_id != token:
        with contextlib.suppress(InvalidArgument):
            return validate_volume_id(volume_id)
    raise Aborted(
        f"starting_token {token[:80]!r} is not a token of this driver: start the listing "
        "again without one"
    )
