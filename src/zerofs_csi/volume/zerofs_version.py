"""The ZeroFS releases the driver supports, and the version an official image tag names.

The range is that of the configuration schema ``servers.zerofs_config`` writes: every
key it emits exists and has the emitted type in this range; 2.3.0 removed ``[lsm]
max_unflushed_gb``, ``[lsm] wal_enabled`` and the ``[wal]`` table. Volume settings check
a StorageClass's image against it without loading the renderer.
"""

from __future__ import annotations

import re

ZEROFS_MIN_VERSION = (2, 3, 0)
ZEROFS_MAX_VERSION_EXCLUSIVE = (3, 0, 0)
SUPPORTED_ZEROFS_VERSIONS = ">=2.3.0,<3.0.0"
DEFAULT_ZEROFS_VERSION = "2.3.0"
ZEROFS_IMAGE_REPOSITORY = "ghcr.io/barre/zerofs"

_VERSION_TAG = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def zerofs_version_supported(version: tuple[int, int, int]) -> bool:
    """Whether a ZeroFS release is in SUPPORTED_ZEROFS_VERSIONS."""
    return ZEROFS_MIN_VERSION <= version < ZEROFS_MAX_VERSION_EXCLUSIVE


def image_zerofs_version(image: str) -> tuple[int, int, int] | None:
    """The ZeroFS version an official image tag names (``X.Y.Z`` or ``X.Y``), else None.

    Only ``ghcr.io/barre/zerofs`` tags are interpreted: a custom image or a digest says
    nothing about its version.
    """
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag or repository != ZEROFS_IMAGE_REPOSITORY:
        return None
    match = _VERSION_TAG.fullmatch(tag)
    if match is None:
        return None
    major, minor, patch = match.groups()
    # A bare X.Y tag follows the newest X.Y.Z; X.Y.0 is its lowest member.
    return int(major), int(minor), int(patch or 0)
