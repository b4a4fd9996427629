"""The lines ``images.sh`` prints, ``<archive> <repository>``: an archive's file name is
``<last part of the repository>-<tag>.tar``, and a tag may hold dashes itself (the
zerofs image's ``<version>-<digest>``)."""

from __future__ import annotations

from pathlib import Path


def archive_tag(archive: str, repository: str) -> str:
    """The tag of the one image in ``archive``, named ``repository``."""
    prefix = repository.rsplit("/", 1)[-1] + "-"
    stem = Path(archive).stem
    if not stem.startswith(prefix):
        raise ValueError(f"{archive} is not named after {repository}")
    return stem[len(prefix) :]
