"""The node on a host without the kernel's nbd module: nothing of a volume can be
attached there, so a lookup finds no device and an unstage of a volume never staged
is answered OK (the CSI spec), as csi-sanity's clean-up of the controller run asks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from zerofs_csi.cli import parse_config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.node.attach import NodeAttacher
from zerofs_csi.server import build

pytestmark = pytest.mark.skipif(
    Path("/sys/module/nbd").exists(), reason="needs a host without the nbd module"
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[csi_pb2_grpc.NodeStub]:
    config = parse_config(
        [
            "--role", "node", "--node-id", "node-a", "--backend", "local",
            "--endpoint", f"unix://{tmp_path}/csi.sock", "--metrics-address", "",
            "--state-dir", str(tmp_path / "state"),
        ]
    )  # fmt: skip
    plugin = build(config, checks=[])
    plugin.server.start()
    with grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel:
        yield csi_pb2_grpc.NodeStub(channel)
    plugin.server.stop(grace=None).wait()
    plugin.close()


def test_no_device_serves_a_volume_without_the_nbd_module() -> None:
    attacher = NodeAttacher(nbd.NbdAttacher())
    try:
        assert attacher.find_device("zerofs-csi:pvc-1") is None
    finally:
        attacher.nbd.close()


def test_unstage_of_a_volume_never_staged_is_ok_without_the_nbd_module(
    node: csi_pb2_grpc.NodeStub, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id="pvc-1", staging_target_path=str(staging))
    )
    assert staging.is_dir() and not any(staging.iterdir())
