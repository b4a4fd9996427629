"""The volume context: what CreateVolume hands to the node for every later call.

It holds the volume's settings as string parameters (``VolumeSettings.to_parameters``,
the ConfigMap already folded in by the controller) and the provisioned capacity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from zerofs_csi.errors import InvalidArgument
from zerofs_csi.volume.settings import VolumeSettings, parse_volume_settings

CAPACITY_KEY = "capacityBytes"
# What external-provisioner's --extra-create-metadata adds to CreateVolume parameters; the
# claim's name and namespace are kept so that the node can post Events on the claim.
PVC_NAME_KEY = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE_KEY = "csi.storage.k8s.io/pvc/namespace"
# ASCII digits only (str.isdigit also takes "²"), no more than an int64 has: capacities
# are int64 on the wire (csi.proto, Volume.capacity_bytes).
_CAPACITY = re.compile(r"[0-9]{1,19}")
_INT64_MAX = 2**63 - 1


def build_volume_context(
    settings: VolumeSettings, capacity_bytes: int, parameters: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The context for a new volume; ``parameters`` are CreateVolume's, for the claim."""
    context = {**settings.to_parameters(), CAPACITY_KEY: str(capacity_bytes)}
    for key in (PVC_NAME_KEY, PVC_NAMESPACE_KEY):
        if parameters and parameters.get(key):
            context[key] = parameters[key]
    return context


def parse_volume_context(context: Mapping[str, str]) -> tuple[VolumeSettings, int]:
    """Settings and capacity from a volume context; InvalidArgument names what is wrong."""
    raw = context.get(CAPACITY_KEY, "")
    if not _CAPACITY.fullmatch(raw) or not 0 < int(raw) <= _INT64_MAX:
        raise InvalidArgument(
            f"volume context key {CAPACITY_KEY!r} must be a positive whole number of bytes"
            " (is the volume provisioned by this driver?)"
        )
    parameters = {k: v for k, v in context.items() if k != CAPACITY_KEY}
    return parse_volume_settings(parameters), int(raw)
