"""Fixtures for the node tests: the plugin as a subprocess, a CSI client, leftover checks.

The plugin runs exactly as a user runs it (``python -m zerofs_csi --role all --backend
local``) with ZeroFS as its server command when there is one (``ZEROFS_BIN``, or
``zerofs`` on PATH), else the ZeroFS stand-in, so every test goes through the real gRPC
API, the real process backend, the real kernel NBD driver and real mounts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from zerofs_csi.bench import plugin as harness
from zerofs_csi.bench.plugin import (
    NODE_ID,
    RPC_TIMEOUT_S,
    SECRETS,
    MiB,
    Mode,
    S3Storage,
    Volume,
    VolumeFactory,
    block_capability,
    clean_up_volumes,
    connected_nbd_devices,
    create_volume,
    mount_capability,
    mounts_under,
    processes_mentioning,
    stop_plugin,
    wait_until,
)
from zerofs_csi.bench.zerofs_server import zerofs_server

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs-standin"
SERVER = zerofs_server()

sys.path.insert(0, str(REPO / "tests" / "s3"))

from minio_server import volume_store  # noqa: E402

sys.path.insert(0, str(REPO / "tools" / "harness"))

from chaos import KernelLog  # noqa: E402


def plugin_store() -> S3Storage | None:
    """The node tests' volumes: file:// for the stand-in, a MinIO bucket for ZeroFS."""
    try:
        return volume_store(SERVER)
    except RuntimeError as exc:
        pytest.fail(str(exc))


# Names the node tests import from here, besides the fixtures.
__all__ = [
    "NODE_ID",
    "RPC_TIMEOUT_S",
    "SECRETS",
    "SERVER",
    "STANDIN",
    "MiB",
    "Mode",
    "PluginProcess",
    "Volume",
    "VolumeFactory",
    "assert_code",
    "assert_nbd_devices",
    "assert_unstaged",
    "block_capability",
    "clean_up_volumes",
    "connected_nbd_devices",
    "create_volume",
    "devices_of",
    "filesystem_uuid",
    "mount_capability",
    "mounts_under",
    "processes_mentioning",
    "settled_nbd_devices",
    "stop_plugin",
    "wait_until",
]


@dataclass
class PluginProcess(harness.PluginProcess):
    """The plugin with the run's per-volume server (ZeroFS, else the stand-in)."""

    zerofs_command: str = SERVER.command
    s3: S3Storage | None = field(default_factory=plugin_store)
    cwd: Path | None = REPO


# -- what the node looks like from outside -------------------------------------------


# After DISCONNECT the kernel keeps a device's sysfs ``pid`` until its last opener (often
# udev's probe of the teardown) closes it.
DEVICE_SETTLE_S = 15.0


def assert_nbd_devices(expected: set[int], what: str = "") -> None:
    """The connected NBD devices become exactly ``expected`` (allowing the settle time)."""
    deadline = time.monotonic() + DEVICE_SETTLE_S
    while (found := connected_nbd_devices()) != expected:
        assert time.monotonic() < deadline, f"{what}: connected {found}, expected {expected}"
        time.sleep(0.05)


def settled_nbd_devices() -> set[int]:
    """The connected NBD devices once the set has stayed the same for a second."""
    deadline = time.monotonic() + DEVICE_SETTLE_S
    found = connected_nbd_devices()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        again = connected_nbd_devices()
        if again == found:
            break
        found = again
    return found


def devices_of(volume_id: str) -> list[int]:
    """Connected NBD devices whose backend id is the volume's."""
    found = []
    for index in connected_nbd_devices():
        try:
            backend = Path(f"/sys/block/nbd{index}/backend").read_text().strip()
        except OSError:
            continue
        if backend == f"zerofs-csi:{volume_id}":
            found.append(index)
    return found


def filesystem_uuid(device: str) -> str:
    return subprocess.run(
        ["blkid", "-p", "-s", "UUID", "-o", "value", device],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


def assert_code(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """``call`` fails with ``code``; returns the error's details."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def assert_unstaged(volume: Volume) -> None:
    """Nothing of the volume's stage is left: record, index, mounts, server, device."""
    plugin = volume.plugin
    assert not (Path(volume.staging) / "zerofs-volume.json").exists()
    assert not (plugin.state_dir / "staged" / f"{volume.volume_id}.json").exists()
    assert not mounts_under(Path(volume.staging))
    assert not [p for p in plugin.server_processes() if volume.volume_id in p[1]]
    wait_until(lambda: not devices_of(volume.volume_id), DEVICE_SETTLE_S, "the device to go")


@pytest.fixture
def kernel_log() -> Iterator[KernelLog]:
    """The kernel's log from the test's start: its ``forbidden`` lines (I/O errors,
    journal aborts, read-only remounts, suspicious replies)."""
    log = KernelLog()
    log.start()
    yield log
    log.close()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginProcess]:
    """One plugin for a test module (starting one costs seconds under TCG)."""
    process = PluginProcess(tmp_path_factory.mktemp("node"))
    process.start()
    yield process
    stop_plugin(process)


@pytest.fixture
def own_plugin(tmp_path: Path) -> Iterator[PluginProcess]:
    """A plugin of the test's own, for tests that kill and restart it."""
    process = PluginProcess(tmp_path)
    process.start()
    yield process
    stop_plugin(process)


@pytest.fixture
def volumes(plugin: PluginProcess) -> Iterator[VolumeFactory]:
    """Creates volumes on the module's plugin; unpublishes, unstages and deletes them after."""

    def make(**kwargs: object) -> Volume:
        return create_volume(plugin, plugin.workdir, **kwargs)  # type: ignore[arg-type]

    yield make
    clean_up_volumes(plugin)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing node test shows the end of the plugin's log."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            if isinstance(value, PluginProcess):
                report.sections.append(("plugin log", value.log_tail()))
        try:
            kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            kernel = f"(dmesg failed: {exc})"
        report.sections.append(("kernel log", "\n".join(kernel.splitlines()[-40:])))
