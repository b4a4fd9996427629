"""The test cluster builds the sidecars the chart pins: its reader of values.yaml
(tools/cluster/chart_images.py, standard library only) must see what Helm sees."""

from __future__ import annotations

import subprocess
import sys

import yaml

from chart.conftest import CHART, ROOT


def test_cluster_scripts_read_the_sidecar_images_the_chart_pins() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    expected = {
        (key, sidecar["image"]["repository"], sidecar["image"]["tag"])
        for key, sidecar in values["sidecars"].items()
    }
    printed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "cluster" / "chart_images.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert {tuple(line.split()) for line in printed.splitlines()} == expected
    assert len(expected) == 5
