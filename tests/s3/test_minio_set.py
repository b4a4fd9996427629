"""The MinIO set's own promises (tests/s3/minio.py): its credentials stay out of sight,
and a server cut off is unreachable while the other serves."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from minio import PORT, SERVERS, MinioSet

pytestmark = pytest.mark.s3


def test_credentials_are_on_no_command_line_and_in_no_log(minio: MinioSet) -> None:
    for server in SERVERS:
        cmdline = Path(f"/proc/{minio.pid(server)}/cmdline").read_bytes().decode()
        assert "server" in cmdline.split("\0")
        assert minio.secret_key not in cmdline
        assert minio.access_key not in cmdline
        log = minio.log_path(server).read_text(errors="replace")
        assert minio.secret_key not in log


def connects(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_a_server_cut_off_is_unreachable_and_back_once_restored(minio: MinioSet) -> None:
    assert connects(minio.addresses["b"], PORT)
    minio.cut_off("b")
    try:
        assert not connects(minio.addresses["b"], PORT)
        assert connects(minio.addresses["a"], PORT)
        assert minio.running("b")
    finally:
        minio.restore("b")
    assert connects(minio.addresses["b"], PORT)
    minio.wait_healthy()
