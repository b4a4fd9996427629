"""Prints the CSI sidecar images charts/zerofs-csi/values.yaml pins, one line each:
``<values key> <repository> <tag>``. Standard library only: the cluster scripts run it
before any virtualenv exists, and the values file is plain enough for a line reader."""

from __future__ import annotations

import re
from pathlib import Path

VALUES = Path(__file__).resolve().parents[2] / "charts" / "zerofs-csi" / "values.yaml"
_BLOCK = re.compile(r"^sidecars:\n((?:[ #].*\n|\n)*)", re.M)
_SIDECAR = re.compile(r"^  (\w+):\n((?:    .*\n|\n)*)", re.M)
_FIELD = re.compile(r"^      (repository|tag): *\"?([^\s\"#]+)", re.M)


def sidecar_images(text: str) -> list[tuple[str, str, str]]:
    block = _BLOCK.search(text)
    if block is None:
        raise SystemExit(f"{VALUES}: no sidecars block")
    images = []
    for key, body in _SIDECAR.findall(block[1]):
        fields = dict(_FIELD.findall(body))
        if set(fields) != {"repository", "tag"}:
            raise SystemExit(f"{VALUES}: sidecars.{key} lacks image.repository or image.tag")
        images.append((key, fields["repository"], fields["tag"]))
    return images


if __name__ == "__main__":
    for image in sidecar_images(VALUES.read_text()):
        print(*image)
