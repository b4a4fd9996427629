"""The local process backend with a real ZeroFS (``ZEROFS_BIN``, or ``zerofs`` on PATH) on
a MinIO bucket: what the driver relies on of ZeroFS, checked against ZeroFS itself
(docs/zerofs-compatibility.md). Skipped where there is no real ZeroFS or no MinIO
(``MINIO_BIN``, which make minio builds).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio_server import MinioServer
from standin.servers import NbdClient

from zerofs_csi import errors
from zerofs_csi.bench.zerofs_server import zerofs_server
from zerofs_csi.nbd import _nbd
from zerofs_csi.servers import ninep
from zerofs_csi.servers.local import ProcessBackend
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

SERVER = zerofs_server()
pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not SERVER.real, reason="no real ZeroFS (ZEROFS_BIN, zerofs on PATH)"),
]

MiB = 1 << 20
VOLUME = "pvc-real-zerofs"
PASSWORD = "pw-real-zerofs-never-shown"
NBD_CMD_TRIM = 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
# ZeroFS 2.3's largest request (zerofs/src/nbd/server.rs MAX_REQUEST_LENGTH).
MAX_REQUEST = 128 * MiB


def s3_settings(one_minio: MinioServer, prefix: str, bucket: str = "volumes") -> VolumeSettings:
    return VolumeSettings(
        storage_url=StorageUrl.parse(f"s3://{bucket}/{prefix}"),
        s3_endpoint=one_minio.endpoint,
        s3_region=one_minio.region,
        s3_allow_http=True,
        pod_ready_timeout_seconds=120,
    )


def s3_secrets(one_minio: MinioServer) -> VolumeSecrets:
    return VolumeSecrets(
        encryption_password=PASSWORD,
        access_key_id=one_minio.access_key,
        secret_access_key=one_minio.secret_key,
    )


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProcessBackend]:
    instance = ProcessBackend(tmp_path / "state", command=[SERVER.command], stop_timeout=30)
    yield instance
    for volume_id in instance.running():
        instance.stop(volume_id)
    instance.close()


def test_file_storage_is_refused_at_start(backend: ProcessBackend, tmp_path: Path) -> None:
    """ZeroFS 2.3 checks at start that its store has put-if-match; object_store's local
    filesystem has none, so a writable server on file:// exits."""
    settings = VolumeSettings(
        storage_url=StorageUrl.parse(f"file://{tmp_path / 'data'}"), pod_ready_timeout_seconds=60
    )
    with pytest.raises(errors.Unavailable) as info:
        backend.ensure(VOLUME, settings, VolumeSecrets(encryption_password=PASSWORD))
    assert "does not support conditional writes" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_serves_nbd_and_9p_with_only_the_export_info(
    backend: ProcessBackend, one_minio: MinioServer, tmp_path: Path
) -> None:
    # A bucket of its own: every object in it is this server's.
    bucket = one_minio.make_bucket("only-one-volume")
    settings = s3_settings(one_minio, tmp_path.name, bucket)
    sockets = backend.ensure(VOLUME, settings, s3_secrets(one_minio))
    # The server made .nbd/ itself: the export's file is created without a mkdir.
    assert ninep.prepare_export(sockets.ninep, VOLUME, 64 * MiB).size_bytes == 64 * MiB

    with _nbd.negotiate(str(sockets.nbd), VOLUME) as negotiated:
        assert negotiated.used_go and negotiated.size_bytes == 64 * MiB
        # NBD_INFO_EXPORT only: no block size constraints.
        assert (negotiated.min_block_size, negotiated.max_block_size) == (0, 0)
        wanted = NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN
        assert negotiated.transmission_flags & wanted == wanted

    data = os.urandom(1 * MiB)
    with NbdClient(sockets.nbd, VOLUME) as client:
        client.write(5 * MiB, data, fua=True)
        client.flush()
        assert client.read(5 * MiB, len(data)) == data

    # Everything is under the volume's prefix, in SlateDB's layout (a manifest first).
    listed = one_minio.client().list_objects_v2(Bucket=bucket)  # type: ignore[attr-defined]
    keys = [entry["Key"] for entry in listed.get("Contents", [])]
    volume_prefix = f"{tmp_path.name}/{VOLUME}/"
    assert keys and all(key.startswith(volume_prefix) for key in keys), keys
    assert any(key.startswith(f"{volume_prefix}manifest/") for key in keys), keys


def test_requests_over_128_mib_are_refused_and_sizes_are_fixed_at_connect(
    backend: ProcessBackend, one_minio: MinioServer, tmp_path: Path
) -> None:
    sockets = backend.ensure(VOLUME, s3_settings(one_minio, tmp_path.name), s3_secrets(one_minio))
    ninep.prepare_export(sockets.ninep, VOLUME, 512 * MiB)
    with NbdClient(sockets.nbd, VOLUME) as client:
        # A TRIM as large as the kernel may send one (discard_max_bytes is 2^32 - 512 on
        # an NBD device): EINVAL, and the connection goes on.
        with pytest.raises(OSError) as refused:
            client._reply(client._request(NBD_CMD_TRIM, 0, 0, 2 * MAX_REQUEST))
        assert refused.value.errno == errno.EINVAL
        client._reply(client._request(NBD_CMD_TRIM, 0, 0, MAX_REQUEST))

        # Grown over 9P, the export keeps its old size on this connection ...
        ninep.prepare_export(sockets.ninep, VOLUME, 1024 * MiB)
        with pytest.raises(OSError):
            client.read(600 * MiB, 4096)
        assert client.read(0, 4096) == bytes(4096)
    # ... and a new one sees the new size.
    with NbdClient(sockets.nbd, VOLUME) as client:
        assert client.size == 1024 * MiB
        assert client.read(600 * MiB, 4096) == bytes(4096)


def test_unknown_config_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[cache]\n"
        f'dir = "{tmp_path / "cache"}"\n'
        "disk_size_gb = 1.0\n"
        "no_such_key = 1\n\n"
        "[storage]\n"
        'url = "memory:///"\n'
        'encryption_password = "pw-unknown-key"\n\n'
        "[servers.nbd]\n"
        f'unix_socket = "{tmp_path / "nbd.sock"}"\n'
    )
    done = subprocess.run(
        [SERVER.command, "run", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "unknown field `no_such_key`" in done.stdout + done.stderr


def test_stop_closes_the_sessions_and_keeps_unflushed_writes(
    backend: ProcessBackend, one_minio: MinioServer, tmp_path: Path
) -> None:
    """The driver stops a server with SIGTERM: ZeroFS ends its NBD sessions, then makes
    everything durable before it exits, so a write answered but never flushed is there
    when a new server opens the volume (as after an unstage and a stage elsewhere)."""
    settings, secrets = s3_settings(one_minio, tmp_path.name), s3_secrets(one_minio)
    sockets = backend.ensure(VOLUME, settings, secrets)
    ninep.prepare_export(sockets.ninep, VOLUME, 64 * MiB)
    data = os.urandom(2 * MiB)
    client = NbdClient(sockets.nbd, VOLUME)
    try:
        client.write(7 * MiB, data)
        backend.stop(VOLUME)
        # The session was ended: the next request finds the connection closed.
        with pytest.raises(OSError):
            client.read(0, 4096)
    finally:
        client._sock.close()

    sockets = backend.ensure(VOLUME, settings, secrets)
    with NbdClient(sockets.nbd, VOLUME) as again:
        assert again.read(7 * MiB, len(data)) == data


def test_a_server_fenced_by_a_newer_writer_exits_and_is_not_restarted(
    backend: ProcessBackend, one_minio: MinioServer, tmp_path: Path
) -> None:
    """A second server of the volume (another node's plugin: its own state directory)
    fences the first at its next write, which exits 1 saying so; the first plugin's
    supervisor leaves it down instead of letting it take the volume back."""
    settings, secrets = s3_settings(one_minio, tmp_path.name), s3_secrets(one_minio)
    sockets = backend.ensure(VOLUME, settings, secrets)
    ninep.prepare_export(sockets.ninep, VOLUME, 64 * MiB)
    fenced_pid = backend.pid(VOLUME)
    assert fenced_pid is not None
    other = ProcessBackend(tmp_path / "other-node", command=[SERVER.command], stop_timeout=30)
    try:
        other.ensure(VOLUME, settings, secrets)
        client = NbdClient(sockets.nbd, VOLUME)
        try:
            with contextlib.suppress(OSError):  # the flush of a fenced writer: no answer
                client.write(0, os.urandom(MiB))
                client.flush()
        finally:
            client._sock.close()
        deadline = time.monotonic() + 60
        while backend.pid(VOLUME) == fenced_pid and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5.0)  # many restart delays
        assert backend.pid(VOLUME) is None
        assert backend.restarts(VOLUME) == 0
        log = (tmp_path / "state" / "servers" / VOLUME / "server.log").read_text()
        assert "detected newer DB client" in log
        assert other.pid(VOLUME) is not None
    finally:
        for volume_id in other.running():
            other.stop(volume_id)
        other.close()
