"""The server pod's fence guard (``objects.FENCE_GUARD_SCRIPT``) run as the pod runs it,
with perl, around the ZeroFS stand-in: a server fenced by a newer writer of its volume
leaves the mark and is not started again; SIGTERM reaches the server; any other exit
leaves no mark."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from zerofs_csi.servers import lives
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.pods import objects

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs_standin.py"
START_TIMEOUT_S = 30.0


@dataclass
class Volume:
    """One volume's storage, with a config per server (each its own sockets)."""

    work: Path

    def config(self, name: str) -> tuple[Path, ServerSockets]:
        sockets = ServerSockets.under(self.work / name, "vol")
        sockets.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "cache": {"dir": str(self.work / name / "cache"), "disk_size_gb": 1.0},
            "storage": {"url": f"file://{self.work}/data", "encryption_password": "${PASSWORD}"},
            "servers": {
                "nbd": {"unix_socket": str(sockets.nbd)},
                "ninep": {"unix_socket": str(sockets.ninep)},
            },
        }
        path = self.work / f"{name}.toml"
        path.write_text(tomli_w.dumps(config))
        return path, sockets


@pytest.fixture
def volume() -> Iterator[Volume]:
    for program in ("perl", "nbdkit", "diod"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (tools/host-packages.txt)")
    work = Path(tempfile.mkdtemp(prefix="zg-"))  # short: the sockets' paths
    try:
        yield Volume(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def guarded(config: Path, sockets: ServerSockets, log: Path) -> subprocess.Popen[bytes]:
    """The stand-in under the guard, as the pod's container runs ZeroFS."""
    command = objects.guarded_command(sockets)
    # The pod runs the image's zerofs; here the stand-in stands for it.
    command[-1:] = [sys.executable, str(STANDIN)]
    with open(log, "wb") as output:
        return subprocess.Popen(
            [*command, "run", "-c", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PASSWORD": "not-a-real-one"},
        )


def plain(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(STANDIN), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PASSWORD": "not-a-real-one"},
    )


def wait_serving(sockets: ServerSockets, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sockets.nbd.is_socket():
        assert process.poll() is None, "the server exited while starting"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def test_a_fenced_server_leaves_the_mark_and_is_not_started_again(volume: Volume) -> None:
    config, sockets = volume.config("older")
    first = guarded(config, sockets, volume.work / "first.log")
    newer: subprocess.Popen[bytes] | None = None
    again: subprocess.Popen[bytes] | None = None
    try:
        wait_serving(sockets, first)
        newer_config, newer_sockets = volume.config("newer")
        newer = plain(newer_config)
        wait_serving(newer_sockets, newer)
        # The stand-in notices within a second; its exit status comes through the guard.
        assert first.wait(timeout=30) == 1
        output = (volume.work / "first.log").read_text()
        assert objects.FENCED_MARKER in output and "serving file://" in output
        assert sockets.fenced.exists()

        # kubelet restarts the container: the guard does not start the server.
        again = guarded(config, sockets, volume.work / "again.log")
        time.sleep(3.0)
        assert again.poll() is None  # waiting, as the pod stays not ready
        assert not sockets.nbd.exists()
        assert newer.poll() is None, "the newer writer was fenced by a restart"
        assert "fenced by a newer writer" in (volume.work / "again.log").read_text()
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=10) == 0
    finally:
        for process in (first, newer, again):
            if process is not None:
                stop(process)


@dataclass
class Serving:
    process: subprocess.Popen[bytes]
    sockets: ServerSockets
    log: Path


@pytest.fixture
def serving(volume: Volume) -> Iterator[Serving]:
    """One guarded server of the volume, serving."""
    config, sockets = volume.config("only")
    log = volume.work / "server.log"
    server = Serving(guarded(config, sockets, log), sockets, log)
    try:
        wait_serving(sockets, server.process)
        yield server
    finally:
        stop(server.process)


def test_sigterm_reaches_the_server_and_a_stop_leaves_no_mark(serving: Serving) -> None:
    serving.process.send_signal(signal.SIGTERM)
    assert serving.process.wait(timeout=30) == 0
    assert "SIGTERM: stopping" in serving.log.read_text()
    assert not serving.sockets.fenced.exists()
    assert not serving.sockets.nbd.exists()  # the server itself stopped and cleaned up
    # Its graceful shutdown is recorded as such: a device may go on with the next one.
    [life] = lives.read_lives(serving.sockets.directory)
    assert life.exited and life.status == 0 and life.clean
    assert lives.lost_writes(serving.sockets.directory, 1) is None


def test_a_server_that_dies_otherwise_leaves_no_mark(serving: Serving) -> None:
    # kill -9 of the server (the guard's child; nbdkit and diod die with it).
    children = subprocess.run(
        ["pgrep", "-P", str(serving.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    assert serving.process.wait(timeout=30) == 128 + signal.SIGKILL
    assert not serving.sockets.fenced.exists()
    [life] = lives.read_lives(serving.sockets.directory)
    assert life.status == 128 + signal.SIGKILL and not life.clean
    assert "killed by SIGKILL" in (lives.lost_writes(serving.sockets.directory, 1) or "")


def test_a_guard_killed_with_its_server_leaves_a_life_with_no_end(serving: Serving) -> None:
    """The container killed whole (its first process, the guard, and the server): the
    next start shows the life before it ended unrecorded."""
    children = subprocess.run(
        ["pgrep", "-P", str(serving.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    serving.process.kill()
    serving.process.wait(timeout=30)
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    lives.record_start(serving.sockets.directory)  # the container started again
    assert [life.exited for life in lives.read_lives(serving.sockets.directory)] == [False, False]
    assert "before it could record its exit" in (
        lives.lost_writes(serving.sockets.directory, 1) or ""
    )
