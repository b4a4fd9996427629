"""The MinIO set's own promises (tests/s3/minio.py): its credentials stay out of sight,
and a server cut off is unreachable while the other serves."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
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


def eventually(condition: Callable[[], bool], within_s: float = 60.0) -> bool:
    """Whether ``condition`` holds within ``within_s``: MinIO notices a peer gone only
    when its requests to it fail or time out."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


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


def test_four_single_drive_servers_keep_write_quorum_with_one_down_and_lose_it_with_two(
    tmp_path: Path,
) -> None:
    """The HA soak's shape (tools/harness/ha_minio.py): any one server may fail under a
    writer; two take write quorum away until one is back."""
    binary = os.environ.get("MINIO_BIN")
    if not binary:
        pytest.skip("MINIO_BIN is not set: make test-s3 builds MinIO (make minio) and sets it")
    shape = MinioSet(tmp_path / "set", Path(binary), servers=("a", "b", "c", "d"),
                     drives_per_server=1)  # fmt: skip
    with shape:
        shape.kill("d")
        assert eventually(lambda: shape.healthy("a"))
        shape.cut_off("c")
        assert eventually(lambda: not shape.healthy("a"))
        shape.restore("c")
        shape.restart("d")
        shape.wait_healthy()
        assert all(shape.healthy(server) for server in shape.servers)


@pytest.mark.parametrize(
    ("servers", "drives"), [(("a",), 4), (("a", "b"), 1), (("a", "b", "c"), 1)]
)
def test_a_set_too_small_to_be_distributed_is_refused(
    tmp_path: Path, servers: tuple[str, ...], drives: int
) -> None:
    with pytest.raises(ValueError, match="2 or more servers and 4 or more drives"):
        MinioSet(tmp_path, Path("/nonexistent"), servers=servers, drives_per_server=drives)
