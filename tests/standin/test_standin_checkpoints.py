"""The stand-in's checkpoints and admin service, as ZeroFS 2.3 has them.

The real stand-in (nbdkit, diod, its gRPC admin service on Debian's python3) is driven
through the driver's own generated ``zerofs.admin`` stubs and through its CLI, and the
checkpoints are read back over NBD from a second stand-in started with ``run
--checkpoint NAME``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from standin.servers import STANDIN, NbdClient, stop_process, wait_for_socket, write_standin_config
from zerofs_csi.nbd._nbd import NBD_FLAG_READ_ONLY
from zerofs_csi.servers import ninep
from zerofs_csi.zerofs_admin import admin_pb2, admin_pb2_grpc

EXPORT = "pvc-1"
SIZE = 64 << 20
ENVIRONMENT = {**os.environ, "STANDIN_TEST_PASSWORD": "pw"}


@dataclass
class Standin:
    process: subprocess.Popen[bytes]
    config: Path
    storage: Path
    nbd: Path
    ninep: Path
    admin: Path
    log: Path

    @contextlib.contextmanager
    def stub(self) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
        with grpc.insecure_channel(f"unix:{self.admin}") as channel:
            yield admin_pb2_grpc.AdminServiceStub(channel)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(STANDIN), *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            env=ENVIRONMENT,
            timeout=60,
            check=False,
        )


def start(directory: Path, storage: Path, *run_args: str) -> Standin:
    """A stand-in serving ``storage`` with its sockets and log under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    run = directory / "run"
    config = write_standin_config(
        directory / "config.toml",
        storage_dir=storage,
        nbd_socket=run / "nbd.sock",
        ninep_socket=run / "9p.sock",
        cache_dir=directory / "cache",
        rpc_socket=run / "admin.sock",
    )
    log = directory / "standin.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(STANDIN), "run", "-c", str(config), *run_args],
            stdout=out,
            stderr=out,
            env=ENVIRONMENT,
            start_new_session=True,
        )
    standin = Standin(
        process, config, storage, run / "nbd.sock", run / "9p.sock", run / "admin.sock", log
    )
    try:
        wait_for_socket(standin.nbd, timeout=30)
        wait_for_socket(standin.admin, timeout=30)  # it may come after NBD
    except TimeoutError:
        stop_process(process)
        raise AssertionError(f"the stand-in did not start: {log.read_text()}") from None
    return standin


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Standin]:
    standin = start(tmp_path / "writer", tmp_path / "data" / EXPORT)
    ninep.prepare_export(standin.ninep, EXPORT, SIZE)
    yield standin
    stop_process(standin.process)


@pytest.fixture
def admin(server: Standin) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with server.stub() as stub:
        yield stub


def create(stub: admin_pb2_grpc.AdminServiceStub, name: str) -> admin_pb2.CheckpointInfo:
    reply = stub.CreateCheckpoint(admin_pb2.CreateCheckpointRequest(name=name), timeout=30)
    return reply.checkpoint


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code()


def test_a_checkpoint_holds_the_volume_as_of_its_instant(
    tmp_path: Path, server: Standin, admin: admin_pb2_grpc.AdminServiceStub
) -> None:
    with NbdClient(server.nbd, EXPORT) as nbd:
        nbd.write(1 << 20, b"before" * 100)
    admin.Flush(admin_pb2.FlushRequest(), timeout=30)
    made = create(admin, "snap-1")
    with NbdClient(server.nbd, EXPORT) as nbd:
        nbd.write(1 << 20, b"AFTER!" * 100)

    assert str(uuid.UUID(made.id)) == made.id and made.name == "snap-1"
    assert made.created_at.seconds > 0 and made.created_at.nanos == 0
    copy = server.storage / ".checkpoints" / made.id / ".nbd" / EXPORT
    # Holes stay holes: 64 MiB of which 600 bytes were written.
    assert copy.stat().st_size == SIZE and copy.stat().st_blocks * 512 < 1 << 20

    reader = start(tmp_path / "reader", server.storage, "--checkpoint", "snap-1")
    try:
        with NbdClient(reader.nbd, EXPORT) as nbd:
            assert nbd.size == SIZE
            assert nbd.read(1 << 20, 600) == b"before" * 100
            # As ZeroFS's: offered writable, each write fails.
            assert not nbd.flags & NBD_FLAG_READ_ONLY
            with pytest.raises(OSError) as refused:
                nbd.write(0, b"x" * 512)
            assert refused.value.errno == errno.EIO
        # A checkpoint server is read-only: it records no checkpoint, but lists them.
        with reader.stub() as stub:
            assert code_of(lambda: create(stub, "snap-2")) == grpc.StatusCode.INTERNAL
            listed = stub.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=30)
            assert [c.name for c in listed.checkpoints] == ["snap-1"]
    finally:
        stop_process(reader.process)
    with NbdClient(server.nbd, EXPORT) as nbd:
        assert nbd.read(1 << 20, 600) == b"AFTER!" * 100


def test_admin_calls_answer_as_zerofs_does(
    server: Standin, admin: admin_pb2_grpc.AdminServiceStub
) -> None:
    first = create(admin, "  daily  ")  # names are trimmed
    assert first.name == "daily"
    assert code_of(lambda: create(admin, "daily")) == grpc.StatusCode.INTERNAL
    assert code_of(lambda: create(admin, " ")) == grpc.StatusCode.INTERNAL
    second = create(admin, "weekly")

    listed = admin.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=30).checkpoints
    assert {(c.name, c.id) for c in listed} == {("daily", first.id), ("weekly", second.id)}
    info = admin.GetCheckpointInfo(admin_pb2.GetCheckpointInfoRequest(name="daily"), timeout=30)
    assert info.checkpoint == first

    missing = admin_pb2.GetCheckpointInfoRequest(name="monthly")
    assert code_of(lambda: admin.GetCheckpointInfo(missing, timeout=30)) == (
        grpc.StatusCode.NOT_FOUND
    )
    unknown = admin_pb2.DeleteCheckpointRequest(name="monthly")
    assert code_of(lambda: admin.DeleteCheckpoint(unknown, timeout=30)) == (
        grpc.StatusCode.INTERNAL
    )

    admin.DeleteCheckpoint(admin_pb2.DeleteCheckpointRequest(name="daily"), timeout=30)
    listed = admin.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=30).checkpoints
    assert [c.name for c in listed] == ["weekly"]
    assert sorted(p.name for p in (server.storage / ".checkpoints").iterdir()) == [second.id]


def test_cli_commands_call_the_running_server(server: Standin) -> None:
    made = server.cli("checkpoint", "create", "nightly")
    assert made.returncode == 0, made.stderr
    assert "nightly" in made.stdout
    again = server.cli("checkpoint", "create", "nightly")
    assert again.returncode == 1 and "exists already" in again.stderr

    listed = server.cli("checkpoint", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("nightly\t")
    info = server.cli("checkpoint", "info", "nightly")
    assert info.returncode == 0 and "name: nightly" in info.stdout
    # As ZeroFS's CLI: info of a missing checkpoint says so and succeeds; delete fails.
    absent = server.cli("checkpoint", "info", "other")
    assert absent.returncode == 0 and "no checkpoint is named 'other'" in absent.stdout
    assert server.cli("checkpoint", "delete", "other").returncode == 1
    assert server.cli("flush").returncode == 0

    deleted = server.cli("checkpoint", "delete", "nightly")
    assert deleted.returncode == 0, deleted.stderr
    assert server.cli("checkpoint", "list").stdout.strip() == "no checkpoints"


def test_read_only_server_serves_the_live_volume_and_records_nothing(
    tmp_path: Path, server: Standin
) -> None:
    with NbdClient(server.nbd, EXPORT) as nbd:
        nbd.write(0, b"live" * 128, fua=True)
    reader = start(tmp_path / "reader", server.storage, "--read-only")
    try:
        with NbdClient(reader.nbd, EXPORT) as nbd:
            assert nbd.read(0, 512) == b"live" * 128
            assert not nbd.flags & NBD_FLAG_READ_ONLY
            with pytest.raises(OSError) as refused:
                nbd.write(0, b"gone" * 128)
            assert refused.value.errno == errno.EIO
            assert nbd.read(0, 512) == b"live" * 128
        with reader.stub() as stub:
            assert code_of(lambda: create(stub, "ro")) == grpc.StatusCode.INTERNAL
    finally:
        stop_process(reader.process)
    assert not (server.storage / ".checkpoints").exists()


def test_run_of_an_unknown_checkpoint_fails_naming_it(tmp_path: Path, server: Standin) -> None:
    config = server.config.read_text().replace(str(server.nbd.parent), str(tmp_path / "other"))
    other = tmp_path / "other.toml"
    other.write_text(config)
    finished = subprocess.run(
        [str(STANDIN), "run", "-c", str(other), "--checkpoint", "never"],
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 1
    assert "no checkpoint is named 'never'" in finished.stderr


def test_nbd_is_served_without_waiting_for_the_admin_service(tmp_path: Path) -> None:
    """The admin service starts beside NBD and 9P, not before them; when it cannot
    start, the stand-in exits 1 saying why, as when any of its servers dies."""
    run = tmp_path / "run"
    config = write_standin_config(
        tmp_path / "config.toml",
        storage_dir=tmp_path / "data",
        nbd_socket=run / "nbd.sock",
        ninep_socket=run / "9p.sock",
        cache_dir=tmp_path / "cache",
        rpc_socket=run / ("a" * 120 + ".sock"),  # longer than a socket address holds
    )
    finished = subprocess.run(
        [str(STANDIN), "run", "-c", str(config)],
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 1
    serving = finished.stderr.find("serving file://")
    refused = finished.stderr.find("the admin service did not start")
    assert 0 <= serving < refused, finished.stderr
