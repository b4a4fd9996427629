"""What each side of the driver loads: the controller runs without the NBD extension,
parsing capabilities loads no mount system calls, and a plugin starts without boto3 or
importlib.metadata.

Each check imports in a fresh interpreter, so that what the test process already
imported does not hide what the modules themselves pull in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CONTROLLER_MODULES = (
    "zerofs_csi.controller.service",
    "zerofs_csi.controller.arguments",
    "zerofs_csi.controller.create_request",
    "zerofs_csi.controller.store",
    "zerofs_csi.controller.store_kube",
    "zerofs_csi.controller.nodes",
    "zerofs_csi.controller.nodes_kube",
    "zerofs_csi.controller.s3cleanup",
    "zerofs_csi.controller.snapshots",
    "zerofs_csi.controller.snapshot_store",
    "zerofs_csi.controller.checkpoints",
    "zerofs_csi.controller.checkpoints_kube",
)
NBD_EXTENSION = "zerofs_csi.nbd._nbd"
MOUNT_CALLS = "zerofs_csi.host.mounts"


def loaded_after(*modules: str) -> set[str]:
    """The modules in sys.modules after importing ``modules``."""
    program = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout))


def test_controller_does_not_load_the_nbd_extension() -> None:
    loaded = loaded_after(*CONTROLLER_MODULES)
    assert set(CONTROLLER_MODULES) <= loaded
    assert NBD_EXTENSION not in loaded


@pytest.mark.parametrize("module", ["zerofs_csi.volume.capabilities", "zerofs_csi.volume.context"])
def test_capabilities_load_no_mount_calls(module: str) -> None:
    loaded = loaded_after(module)
    assert module in loaded
    assert MOUNT_CALLS not in loaded


def test_limits_are_the_extensions() -> None:
    from zerofs_csi.nbd import _nbd, limits

    assert limits.MAX_CONNECTIONS == _nbd.MAX_SOCKETS


@pytest.mark.parametrize(
    "module", ["zerofs_csi.runtime", "zerofs_csi.server", "zerofs_csi.link_keeper"]
)
def test_a_plugin_starts_without_boto3(module: str) -> None:
    # boto3 is the slowest import (seconds on a small node) and only DeleteVolume's S3
    # clean-up uses it: a restarting node plugin must not wait for it.
    loaded = loaded_after(module)
    assert module in loaded
    assert not {name for name in loaded if name.split(".")[0] in ("boto3", "botocore")}


@pytest.mark.parametrize(
    "module", ["zerofs_csi.cli", "zerofs_csi.server", "zerofs_csi.link_keeper"]
)
def test_a_plugin_starts_without_reading_package_metadata(module: str) -> None:
    # importlib.metadata (email, zipfile, csv, a scan of sys.path) cost every process
    # start about two seconds under the test bed's emulated CPU, for the version alone.
    loaded = loaded_after(module)
    assert module in loaded
    assert "importlib.metadata" not in loaded


def test_the_version_is_one_everywhere() -> None:
    import importlib.metadata
    from pathlib import Path

    import yaml

    import zerofs_csi

    assert importlib.metadata.version("zerofs-csi") == zerofs_csi.__version__
    charts = Path(__file__).resolve().parents[2] / "charts"
    for chart in ("zerofs-csi", "zerofs-csi-validation"):
        meta = yaml.safe_load((charts / chart / "Chart.yaml").read_text())
        assert str(meta["appVersion"]) == zerofs_csi.__version__, chart
