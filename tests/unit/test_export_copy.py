"""copy_export against real NBD servers (nbdkit) with the real nbdcopy: the data lands,
holes stay holes, progress is reported up to 100, and each way it can fail gives its
gRPC code with what went wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from zerofs_csi import errors
from zerofs_csi.bench.plugin import wait_until
from zerofs_csi.host.unix_socket import accepts
from zerofs_csi.servers import export_copy
from zerofs_csi.servers.export_copy import copy_export

pytestmark = pytest.mark.skipif(
    shutil.which("nbdkit") is None or shutil.which("nbdcopy") is None,
    reason="nbdkit and nbdcopy (libnbd-bin) are needed",
)

MiB = 1 << 20
SIZE = 16 * MiB


@dataclass
class Server:
    socket: Path
    image: Path  # the file nbdkit serves


Serve = Callable[..., Server]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *filters: str, params: tuple[str, ...] = ()) -> Server:
        image = tmp_path / f"{name}.img"
        if not image.exists():
            with image.open("wb") as f:
                f.truncate(SIZE)
        socket = tmp_path / f"{name}.sock"
        process = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(socket), *filters, "file", str(image), *params],
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_until(lambda: accepts(socket), 10, f"nbdkit on {socket}")
        return Server(socket, image)

    yield start
    for process in processes:
        process.terminate()
        process.wait()


def test_the_data_is_copied_holes_stay_holes_and_progress_reaches_100(serve: Serve) -> None:
    source = serve("source")
    with source.image.open("r+b") as f:
        f.seek(5 * MiB)
        data = os.urandom(MiB)
        f.write(data)
    target = serve("target")
    reports: list[int] = []

    copy_export(source.socket, "source", target.socket, "target", progress=reports.append)

    copied = target.image.read_bytes()
    assert copied[5 * MiB : 6 * MiB] == data
    assert copied[: 5 * MiB] == bytes(5 * MiB) and copied[6 * MiB :] == bytes(SIZE - 6 * MiB)
    assert target.image.stat().st_blocks * 512 <= 2 * MiB  # only the MiB of data written
    assert reports and reports[-1] == 100 and reports == sorted(reports), reports


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("no server at the source", grpc.StatusCode.INTERNAL, "failed: nbdcopy:"),
        ("nbdcopy not installed", grpc.StatusCode.FAILED_PRECONDITION, "libnbd-bin"),
        ("a copy past its time", grpc.StatusCode.DEADLINE_EXCEEDED, "took longer than 1s"),
    ],
)
def test_failures_carry_their_code(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str, code: grpc.StatusCode,
    words: str,
) -> None:  # fmt: skip
    target = serve("target")
    source_socket = tmp_path / "nobody.sock"
    timeout_s = 60.0
    if case == "nbdcopy not installed":
        monkeypatch.setattr(export_copy, "NBDCOPY", str(tmp_path / "no-nbdcopy"))
    if case == "a copy past its time":
        # Every read and extents request of the source takes 5 s.
        source_socket = serve(
            "slow", "--filter=delay", params=("delay-read=5", "delay-extents=5")
        ).socket
        timeout_s = 1.0

    with pytest.raises(errors.CsiError) as failure:
        copy_export(source_socket, "source", target.socket, "target", timeout_s=timeout_s)

    assert failure.value.code == code
    assert words in failure.value.message, failure.value.message
