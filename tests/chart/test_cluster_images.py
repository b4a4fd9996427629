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
    assert len(expected) == 6


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a mapping that names a key twice, which YAML loaders (Helm's too) take
    silently, the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = {key for key in keys if keys.count(key) > 1}
        assert not repeated, f"line {node.start_mark.line + 1}: repeated keys {repeated}"
        return super().construct_mapping(node, deep=deep)


def test_values_name_each_key_once() -> None:
    # The cluster scripts read values.yaml line by line and would see both copies.
    yaml.load((CHART / "values.yaml").read_text(), Loader=_UniqueKeyLoader)  # noqa: S506
