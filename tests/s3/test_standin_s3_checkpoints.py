"""The stand-in's checkpoints on s3:// storage, against a real S3 server (Ceph radosgw).

A checkpoint is a server-side copy of the volume's export objects inside its prefix
(``<prefix>/.checkpoints/<id>/``), so that deleting the volume's prefix deletes it; ``run
--checkpoint NAME`` serves it read-only. Driven through the driver's own admin stubs and
real NBD clients; the bucket is listed to see where everything went.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from radosgw import RadosGateway
from standin.servers import STANDIN, NbdClient, load_standin, require_tool

from zerofs_csi.controller.s3cleanup import delete_volume_data
from zerofs_csi.host.unix_socket import accepts
from zerofs_csi.nbd._nbd import NBD_FLAG_READ_ONLY
from zerofs_csi.servers import ninep
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl
from zerofs_csi.zerofs_admin import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.s3

VOLUME = "pvc-1"
PREFIX = f"base/{VOLUME}/"
MiB = 1 << 20
BYSTANDER = "base/pvc-10/.nbd/pvc-10"
OBJECT = load_standin().OBJECT_SIZE
START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def standin(directory: Path, gateway: RadosGateway, bucket: str, *run_args: str) -> Iterator[Path]:
    """A stand-in of the volume with its sockets in ``directory``; yields that directory."""
    directory.mkdir(parents=True)
    settings = VolumeSettings(
        storage_url=StorageUrl("s3", bucket, "base"),
        s3_endpoint=gateway.endpoint,
        s3_allow_http=True,
        s3_region=gateway.region,
    )
    secrets = VolumeSecrets(
        encryption_password="pw",
        access_key_id=gateway.access_key,
        secret_access_key=gateway.secret_key,
    )
    rendered = render_zerofs_config(
        settings,
        VOLUME,
        secrets,
        cache_dir=str(directory / "cache"),
        nbd_socket=str(directory / "nbd.sock"),
        ninep_socket=str(directory / "9p.sock"),
        rpc_socket=str(directory / "admin.sock"),
    )
    (directory / "config.toml").write_text(rendered.toml_text)
    log = directory / "standin.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(STANDIN), "run", "-c", str(directory / "config.toml"), *run_args],
            stdout=out,
            stderr=out,
            env={"PATH": os.environ["PATH"], **rendered.secret_env},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(directory / "nbd.sock"):
            assert process.poll() is None, f"the stand-in exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"no socket yet: {log.read_text()}"
            time.sleep(0.1)
        yield directory
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def admin(directory: Path) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(f"unix:{directory / 'admin.sock'}") as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    found = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found |= {entry["Key"] for entry in page.get("Contents", [])}
    return found


def test_a_checkpoint_is_a_copy_inside_the_prefix_served_read_only(
    tmp_path: Path, radosgw: RadosGateway, s3: Any, bucket: str
) -> None:
    require_tool("nbdkit")
    s3.put_object(Bucket=bucket, Key=BYSTANDER, Body=b"1048576")
    with standin(tmp_path / "writer", radosgw, bucket) as writer:
        ninep.prepare_export(writer / "9p.sock", VOLUME, 4 * MiB)
        with NbdClient(writer / "nbd.sock", VOLUME) as nbd:
            nbd.write(MiB, b"before" * 1000)
        with admin(writer) as stub:
            stub.Flush(admin_pb2.FlushRequest(), timeout=60)
            made = stub.CreateCheckpoint(
                admin_pb2.CreateCheckpointRequest(name="snap"), timeout=120
            ).checkpoint
            with pytest.raises(grpc.RpcError) as taken:
                stub.CreateCheckpoint(admin_pb2.CreateCheckpointRequest(name="snap"), timeout=60)
            assert taken.value.code() == grpc.StatusCode.INTERNAL
        with NbdClient(writer / "nbd.sock", VOLUME) as nbd:
            nbd.write(MiB, b"AFTER!" * 1000)

        copied = keys(s3, bucket, f"{PREFIX}.checkpoints/{made.id}/")
        assert f"{PREFIX}.checkpoints/{made.id}/checkpoint.json" in copied
        assert f"{PREFIX}.checkpoints/{made.id}/.nbd/{VOLUME}" in copied
        assert any("/.nbd-blocks/" in key for key in copied)

        with standin(tmp_path / "reader", radosgw, bucket, "--checkpoint", "snap") as reader:
            with NbdClient(reader / "nbd.sock", VOLUME) as nbd:
                assert nbd.size == 4 * MiB
                assert nbd.read(MiB, 6000) == b"before" * 1000
                # Blocks never written read as zeroes (answered from the listing of the
                # checkpoint's blocks), alone and beside written ones.
                assert nbd.read(0, 4096) == bytes(4096)
                assert nbd.read(3 * MiB, MiB) == bytes(MiB)
                whole = bytes(MiB) + b"before" * 1000 + bytes(3 * MiB - 6000)
                assert nbd.read(0, 4 * MiB) == whole
                # As ZeroFS's: offered writable, each write fails.
                assert not nbd.flags & NBD_FLAG_READ_ONLY
                with pytest.raises(OSError) as refused:
                    nbd.write(MiB, b"x" * 512)
                assert refused.value.errno == errno.EIO
            with admin(reader) as stub:
                listed = stub.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=60)
                assert [c.name for c in listed.checkpoints] == ["snap"]
        with NbdClient(writer / "nbd.sock", VOLUME) as nbd:
            assert nbd.read(MiB, 6000) == b"AFTER!" * 1000

        with admin(writer) as stub:
            stub.DeleteCheckpoint(admin_pb2.DeleteCheckpointRequest(name="snap"), timeout=120)
            missing = admin_pb2.GetCheckpointInfoRequest(name="snap")
            with pytest.raises(grpc.RpcError) as gone:
                stub.GetCheckpointInfo(missing, timeout=60)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert keys(s3, bucket, f"{PREFIX}.checkpoints/") == set()

        # Everything is the volume's, under its prefix, or the untouched bystander.
        with admin(writer) as stub:
            stub.CreateCheckpoint(admin_pb2.CreateCheckpointRequest(name="kept"), timeout=120)
        assert {key for key in keys(s3, bucket) if not key.startswith(PREFIX)} == {BYSTANDER}
    # Deleting the volume's prefix deletes its checkpoints with it.
    delete_volume_data(
        VolumeSettings(
            storage_url=StorageUrl("s3", bucket, "base"),
            s3_endpoint=radosgw.endpoint,
            s3_allow_http=True,
            s3_region=radosgw.region,
        ),
        VOLUME,
        VolumeSecrets(
            encryption_password="pw",
            access_key_id=radosgw.access_key,
            secret_access_key=radosgw.secret_key,
        ),
    )
    assert keys(s3, bucket) == {BYSTANDER}


def stored(s3: Any, bucket: str, block: int, prefix: str = PREFIX) -> bytes | None:
    key = f"{prefix}.nbd-blocks/{VOLUME}/{block:016x}"
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
    except s3.exceptions.NoSuchKey:
        return None


def test_flush_and_checkpoints_take_the_writes_not_flushed_yet(
    tmp_path: Path, radosgw: RadosGateway, s3: Any, bucket: str
) -> None:
    """Answered writes wait in the write-back area until a flush (as in ZeroFS's
    memory): the Flush call stores them, and a checkpoint holds every write answered
    before it was asked for."""
    require_tool("nbdkit")
    with standin(tmp_path / "writer", radosgw, bucket) as writer:
        ninep.prepare_export(writer / "9p.sock", VOLUME, 4 * MiB)
        with NbdClient(writer / "nbd.sock", VOLUME) as nbd:
            nbd.write(0, b"flushed" * 1000)
        assert stored(s3, bucket, 0) is None
        with admin(writer) as stub:
            stub.Flush(admin_pb2.FlushRequest(), timeout=60)
        assert stored(s3, bucket, 0) == (b"flushed" * 1000).ljust(OBJECT, b"\0")

        with NbdClient(writer / "nbd.sock", VOLUME) as nbd:
            nbd.write(MiB, b"answered" * 1000)
        assert stored(s3, bucket, MiB // OBJECT) is None
        with admin(writer) as stub:
            made = stub.CreateCheckpoint(
                admin_pb2.CreateCheckpointRequest(name="unflushed"), timeout=120
            ).checkpoint
        in_checkpoint = stored(s3, bucket, MiB // OBJECT, f"{PREFIX}.checkpoints/{made.id}/")
        assert in_checkpoint == (b"answered" * 1000).ljust(OBJECT, b"\0")
        served = standin(tmp_path / "reader", radosgw, bucket, "--checkpoint", "unflushed")
        with served as reader, NbdClient(reader / "nbd.sock", VOLUME) as nbd:
            assert nbd.read(0, 7000) == b"flushed" * 1000
            assert nbd.read(MiB, 8000) == b"answered" * 1000
