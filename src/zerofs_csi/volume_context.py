"""The volume context: what CreateVolume hands to the node for every later call.

It holds the volume's settings as string parameters (``VolumeSettings.to_parameters``,
the ConfigMap already folded in by the controller) and the provisioned capacity.
"""

from __future__ import annotations

from collections.abc import Mapping

from zerofs_csi.errors import InvalidArgument
from zerofs_csi.volume_settings import VolumeSettings, parse_volume_settings

CAPACITY_KEY = "capacityBytes"


def build_volume_context(settings: VolumeSettings, capacity_bytes: int) -> dict[str, str]:
    return {**settings.to_parameters(), CAPACITY_KEY: str(capacity_bytes)}


def parse_volume_context(context: Mapping[str, str]) -> tuple[VolumeSettings, int]:
    """Settings and capacity from a volume context; InvalidArgument names what is wrong."""
    raw = context.get(CAPACITY_KEY, "")
    if not raw.isdigit() or int(raw) <= 0:
        raise InvalidArgument(
            f"volume context key {CAPACITY_KEY!r} must be a positive whole number of bytes"
            " (is the volume provisioned by this driver?)"
        )
    parameters = {k: v for k, v in context.items() if k != CAPACITY_KEY}
    return parse_volume_settings(parameters), int(raw)
