"""Volume ids: one check that makes an id safe everywhere the driver uses it.

The CSI CreateVolume name becomes the volume id, and the id is then used as a path
component on the node, an NBD export name, the suffix of Kubernetes object names
(``zerofs-volume-<id>``, ``zerofs-config-<id>``) and a segment of S3 keys. The
strictest of these is a Kubernetes object name that is also valid as a label value:
a DNS-1123 label of at most 63 characters (lowercase alphanumerics and '-', starting
and ending with an alphanumeric). external-provisioner names volumes ``pvc-<uuid>``
(40 characters), which fits.
"""

from __future__ import annotations

import re

from zerofs_csi import errors

# The longest prefix put in front of an id in a Kubernetes object name.
OBJECT_NAME_PREFIXES = ("zerofs-volume-", "zerofs-config-")
# DNS-1123 label limit (Kubernetes validation: IsDNS1123Label).
DNS1123_LABEL_MAX = 63
MAX_VOLUME_ID_LENGTH = DNS1123_LABEL_MAX - max(len(p) for p in OBJECT_NAME_PREFIXES)

_VOLUME_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


def validate_volume_id(volume_id: str) -> str:
    """Return ``volume_id`` unchanged if it is safe, else raise InvalidArgument.

    Safe means: 1 to MAX_VOLUME_ID_LENGTH characters, lowercase ASCII letters, digits
    and '-', starting and ending with a letter or digit. That excludes '/', '.', '..',
    whitespace and every character that needs quoting in a path, an export name, an
    object name or an S3 key.
    """
    if not isinstance(volume_id, str) or not volume_id:
        raise errors.InvalidArgument("volume id is required and must be a non-empty string")
    if len(volume_id) > MAX_VOLUME_ID_LENGTH:
        raise errors.InvalidArgument(
            f"volume id is {len(volume_id)} characters long; at most {MAX_VOLUME_ID_LENGTH} "
            f"are allowed so that 'zerofs-volume-<id>' stays a valid Kubernetes name "
            f"({DNS1123_LABEL_MAX} characters)"
        )
    if not _VOLUME_ID.fullmatch(volume_id):
        shown = volume_id if len(volume_id) <= 80 else volume_id[:80] + "..."
        raise errors.InvalidArgument(
            f"volume id {shown!r} is not allowed: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (a DNS-1123 label)"
        )
    return volume_id
