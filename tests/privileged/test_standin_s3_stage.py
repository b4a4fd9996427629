"""A volume on s3:// through the plugin (local backend, ZeroFS or else the stand-in),
against a Ceph radosgw started in the same machine (the microVM has no network of its own).

python3 tests/vm/runner.py --timeout 1800 -- .venv/bin/pytest -m privileged -q \
    -p no:cacheprovider tests/privileged/test_standin_s3_stage.py
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RPC_TIMEOUT_S,
    SECRETS,
    SERVER,
    MiB,
    PluginProcess,
    filesystem_uuid,
    mount_capability,
    mounts_under,
)
from test_node_stage import digest_of, write_file

from zerofs_csi.csi import csi_pb2
from zerofs_csi.host import mounts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "s3"))

from radosgw import BINARIES, DEBIAN_PACKAGES, RadosGateway  # noqa: E402
from s3store import client_of  # noqa: E402

# Long under TCG (radosgw in the microVM: 8 to 16 minutes); make test-e2e runs the same
# path through the chart (the stand-in's pod on radosgw, restaged from S3 alone, deleted
# with its PVC, other objects kept), so make test leaves it to make test-long.
pytestmark = [pytest.mark.privileged, pytest.mark.long]

BUCKET = "zerofs-csi-stage"
BYSTANDERS = {"base/pvc-other/.nbd/pvc-other": b"1048576", "root-object": b"untouched"}
SIZE = 64 * MiB
DATA_MIB = 6
# radosgw takes about 50 s to start under the microVM's TCG.
GATEWAY_START_TIMEOUT_S = 600.0
SERVER_READY_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadosGateway]:
    missing = [binary for binary in BINARIES if shutil.which(binary) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install {' '.join(DEBIAN_PACKAGES)} on the host "
            "(the VM runner does; the guest's userland is the host's)"
        )
    running = RadosGateway(tmp_path_factory.mktemp("rgw"), start_timeout=GATEWAY_START_TIMEOUT_S)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def s3(gateway: RadosGateway) -> Any:
    client = client_of(gateway)
    client.create_bucket(Bucket=BUCKET)
    for key, body in BYSTANDERS.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    return client


def objects(s3: Any) -> dict[str, bytes]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for entry in page.get("Contents", []):
            found[entry["Key"]] = s3.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
    return found


def test_a_volume_on_s3_comes_back_from_s3_alone_and_is_deleted_with_its_pvc(
    plugin: PluginProcess, gateway: RadosGateway, s3: Any
) -> None:
    secrets = {
        **SECRETS,
        "AWS_ACCESS_KEY_ID": gateway.access_key,
        "AWS_SECRET_ACCESS_KEY": gateway.secret_key,
    }
    capability = mount_capability("ext4")
    created = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-on-s3",
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[capability],
            parameters={
                "storageUrl": f"s3://{BUCKET}/base",
                "s3Endpoint": gateway.endpoint,
                "s3AllowHttp": "true",
                "s3Region": gateway.region,
                "deleteDataOnPVCDelete": "true",
                "filesystem": "ext4",
                # The stand-in's nbdkit imports boto3 before it listens: minutes under
                # TCG on a loaded host.
                "podReadyTimeoutSeconds": str(SERVER_READY_TIMEOUT_S),
            },
            secrets=secrets,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    vid = created.volume.volume_id
    context = dict(created.volume.volume_context)
    staging = plugin.workdir / "kubelet" / "staging" / vid
    target = plugin.workdir / "pods" / vid / "volume"
    prefix = f"base/{vid}/"

    def stage() -> str:
        plugin.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                volume_capability=capability,
                volume_context=context,
                secrets=secrets,
            ),
            timeout=SERVER_READY_TIMEOUT_S + RPC_TIMEOUT_S,
        )
        plugin.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=capability,
                volume_context=context,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        mount = mounts.find_mount(staging / "mount")
        assert mount is not None and mount.fstype == "ext4"
        return filesystem_uuid(mount.source)

    def unstage() -> None:
        plugin.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
            timeout=RPC_TIMEOUT_S,
        )
        plugin.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
            timeout=RPC_TIMEOUT_S,
        )
        assert not mounts_under(staging) and not mounts_under(target)

    try:
        uuid = stage()
        digest = write_file(target / "data.bin", DATA_MIB, vid.encode())
        unstage()

        # The server is gone and so is its local directory: only S3 holds the volume.
        assert not (plugin.state_dir / "servers" / vid / "cache").exists()
        stored = objects(s3)
        strangers = {key for key in stored if key not in BYSTANDERS and not key.startswith(prefix)}
        assert not strangers, sorted(strangers)
        if SERVER.real:
            # ZeroFS's layout is SlateDB's (manifest, WAL, SSTs), all under the prefix.
            assert any(key.startswith(f"{prefix}manifest/") for key in stored), sorted(stored)
        else:
            assert stored[f"{prefix}.nbd/{vid}"] == str(SIZE).encode()
            blocks = [key for key in stored if key.startswith(f"{prefix}.nbd-blocks/{vid}/")]
            assert len(blocks) >= DATA_MIB

        # Staged again, the export comes back from S3: same filesystem, same data.
        assert stage() == uuid
        assert digest_of(target / "data.bin") == digest
        unstage()
    finally:
        plugin.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
            timeout=RPC_TIMEOUT_S,
        )
        plugin.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
            timeout=RPC_TIMEOUT_S,
        )
        plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vid, secrets=secrets), timeout=RPC_TIMEOUT_S
        )

    # deleteDataOnPVCDelete: the volume's objects are gone, nothing else is.
    assert objects(s3) == BYSTANDERS
