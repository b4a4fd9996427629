"""Volume ids: one check that makes an id safe everywhere the driver uses it, and the
mapping from CSI CreateVolume names to ids.

A volume id is used as a path component on the node, an NBD export name, the suffix of
Kubernetes object names (``zerofs-volume-<id>``, ``zerofs-config-<id>``) and a segment
of S3 keys. The strictest of these is a Kubernetes object name that is also valid as a
label value: a DNS-1123 label of at most 63 characters (lowercase alphanumerics and '-',
starting and ending with an alphanumeric), which leaves 49 characters for the id.

A CreateVolume name may be any Unicode string of at most 128 bytes without the spec's
banned control characters, so the plugin derives the id: a name that is already a valid
id is its own id (external-provisioner's ``pvc-<uuid>``, 40 characters, and every volume
created before names were mapped); any other name becomes a readable slug of it plus a
hash of the whole name. The mapping is deterministic, so a retried CreateVolume finds
the volume it created; the controller keeps the name in the volume's record and refuses
a name whose id belongs to a volume of another name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from zerofs_csi import errors

# The longest prefix put in front of an id in a Kubernetes object name.
OBJECT_NAME_PREFIXES = ("zerofs-volume-", "zerofs-config-")
# DNS-1123 label limit (Kubernetes validation: IsDNS1123Label).
DNS1123_LABEL_MAX = 63
MAX_VOLUME_ID_LENGTH = DNS1123_LABEL_MAX - max(len(p) for p in OBJECT_NAME_PREFIXES)
# CSI spec, "Size Limits": a string field is at most 128 bytes.
MAX_NAME_BYTES = 128
# 64 bits of SHA-256: names colliding by chance would need billions of volumes, and the
# record's name check turns even that into an error instead of a shared volume.
NAME_HASH_CHARS = 16
# The slug keeps what fits before "-<hash>".
_SLUG_CHARS = MAX_VOLUME_ID_LENGTH - NAME_HASH_CHARS - 1

_VOLUME_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# CSI spec, CreateVolumeRequest.name: control characters other than common whitespace.
_BANNED_IN_NAMES = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


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


def validate_name(name: str) -> str:
    """Return a CreateVolume ``name`` the CSI spec allows, else raise InvalidArgument."""
    if not name:
        raise errors.InvalidArgument("name is required")
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise errors.InvalidArgument(
            f"name is {size} bytes long; the CSI spec allows at most {MAX_NAME_BYTES}"
        )
    banned = _BANNED_IN_NAMES.search(name)
    if banned is not None:
        raise errors.InvalidArgument(
            f"name contains the control character U+{ord(banned.group()):04X}, which the "
            "CSI spec does not allow in names"
        )
    return name


def volume_id_for_name(name: str) -> str:
    """The volume id of the CreateVolume ``name``: the name itself if it is a valid
    id, else ``<slug>-<hash>`` (the hash alone when nothing of the name is readable)."""
    validate_name(name)
    if len(name) <= MAX_VOLUME_ID_LENGTH and _VOLUME_ID.fullmatch(name):
        return name
    # Accents come off (NFKD, then ASCII); whatever else is not a letter or digit
    # becomes one '-'.
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = _NOT_SLUG.sub("-", ascii_name.lower()).strip("-")[:_SLUG_CHARS].rstrip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:NAME_HASH_CHARS]
    return f"{slug}-{digest}" if slug else digest
