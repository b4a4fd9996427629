"""What the driver relies on of a server's checkpoints, held against the stand-in and a
real ZeroFS (``ZEROFS_BIN``, or ``zerofs`` on PATH) alike, both on a MinIO bucket: the
admin service's answers (a name taken, empty or unknown; a read-only server), and what
``run --checkpoint NAME`` and ``run --read-only`` serve beside the volume's writer.
Each server is started as the driver starts a short-lived one (``servers.brief``).
Skipped without MinIO (``MINIO_BIN``, which make minio builds); ZeroFS's run without a
real ZeroFS.
"""

from __future__ import annotations

import errno
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest
from minio_server import MinioServer
from standin.servers import STANDIN, NbdClient, require_tool

from zerofs_csi.bench.zerofs_server import zerofs_server
from zerofs_csi.nbd._nbd import NBD_FLAG_READ_ONLY
from zerofs_csi.servers import ninep
from zerofs_csi.servers.brief import BriefServer, brief_server
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl
from zerofs_csi.zerofs_admin import admin_pb2

pytestmark = pytest.mark.s3

VOLUME = "pvc-checkpoints"
MiB = 1 << 20
OFFSET = 1 * MiB
BEFORE, AFTER = b"before" * 1000, b"AFTER!" * 1000
REAL = zerofs_server()
SERVERS = [
    pytest.param(str(STANDIN), id="stand-in"),
    pytest.param(
        REAL.command,
        id="zerofs",
        marks=pytest.mark.skipif(not REAL.real, reason="no real ZeroFS (ZEROFS_BIN, zerofs)"),
    ),
]


def code_of(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=60)  # type: ignore[operator]
    return refused.value.code()  # type: ignore[no-any-return]


@pytest.mark.parametrize("command", SERVERS)
def test_checkpoints_and_read_only_servers(
    command: str, one_minio: MinioServer, tmp_path: Path
) -> None:
    require_tool("nbdkit")
    settings = VolumeSettings(
        storage_url=StorageUrl.parse(f"s3://volumes/{tmp_path.name}"),
        s3_endpoint=one_minio.endpoint,
        s3_region=one_minio.region,
        s3_allow_http=True,
        pod_ready_timeout_seconds=120,
    )
    secrets = VolumeSecrets(
        encryption_password="pw-checkpoint-servers",
        access_key_id=one_minio.access_key,
        secret_access_key=one_minio.secret_key,
    )

    def server(role: str, *run_args: str) -> AbstractContextManager[BriefServer]:
        return brief_server([command], tmp_path / role, VOLUME, settings, secrets, run_args)

    def reads(each: BriefServer, expected: bytes) -> None:
        with NbdClient(each.nbd, VOLUME) as nbd:
            assert nbd.size == 4 * MiB
            assert nbd.read(OFFSET, len(expected)) == expected
            # Offered writable (ZeroFS 2.3 never sets READ_ONLY: the driver makes the
            # device read-only itself), each write fails.
            assert not nbd.flags & NBD_FLAG_READ_ONLY
            with pytest.raises(OSError) as refused:
                nbd.write(OFFSET, AFTER if expected == BEFORE else BEFORE)
            assert refused.value.errno == errno.EIO
            assert nbd.read(OFFSET, len(expected)) == expected

    with server("writer") as writer:
        ninep.prepare_export(writer.ninep, VOLUME, 4 * MiB)
        with NbdClient(writer.nbd, VOLUME) as nbd:
            nbd.write(OFFSET, BEFORE)
        stub = writer.admin._stub
        stub.Flush(admin_pb2.FlushRequest(), timeout=60)
        made = writer.admin.create("snap")
        assert made.name == "snap" and made.id and made.created_at.timestamp() > 0
        assert writer.admin.find("snap") == made
        assert [c.name for c in writer.admin.list()] == ["snap"]
        # The refusals, with the codes the driver reads them by.
        Create = admin_pb2.CreateCheckpointRequest
        assert code_of(stub.CreateCheckpoint, Create(name="snap")) == grpc.StatusCode.INTERNAL
        assert code_of(stub.CreateCheckpoint, Create(name=" ")) == grpc.StatusCode.INTERNAL
        assert writer.admin.find("missing") is None
        Delete = admin_pb2.DeleteCheckpointRequest
        assert code_of(stub.DeleteCheckpoint, Delete(name="missing")) == grpc.StatusCode.INTERNAL

        with NbdClient(writer.nbd, VOLUME) as nbd:
            nbd.write(OFFSET, AFTER)
            nbd.flush()
        stub.Flush(admin_pb2.FlushRequest(), timeout=60)

        # Beside the writer: the checkpoint as it was, and the live volume, read-only.
        with server("checkpoint", "--checkpoint", "snap") as reader:
            reads(reader, BEFORE)
            assert [c.name for c in reader.admin.list()] == ["snap"]
            refused = code_of(reader.admin._stub.CreateCheckpoint, Create(name="other"))
            assert refused == grpc.StatusCode.INTERNAL
        with server("live", "--read-only") as reader:
            reads(reader, AFTER)

        with NbdClient(writer.nbd, VOLUME) as nbd:
            assert nbd.read(OFFSET, len(AFTER)) == AFTER
        writer.admin.delete("snap")
        assert writer.admin.find("snap") is None
        assert writer.admin.list() == []
