"""The job pods' programs against real servers of the ZeroFS stand-in, as the pods run
them. The restore's copy (servers.pods.restore_copy), between a server of a checkpoint
(read-only) and one of the new volume: the data as of the checkpoint lands in the new
export and progress is printed. The checkpoint job (servers.pods.checkpoint_job), through
the volume's server: the checkpoint is created or deleted and reported. Each failure ends
with status 1 and ``CODE: message`` in the termination log."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from standin.servers import STANDIN

from zerofs_csi.servers.brief import brief_server
from zerofs_csi.servers.pods import checkpoint_job, job_program, restore_copy
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import parse_volume_settings

SECRETS = VolumeSecrets.from_csi_secrets({"ZEROFS_ENCRYPTION_PASSWORD": "pw-restore-copy"})
MiB = 1 << 20
SIZE = 8 * MiB
SOURCE, TARGET = "pvc-source", "pvc-target"


@dataclass
class Pod:
    """The restore pod's sockets and storage, on this host."""

    root: Path
    store: Path

    def export(self, volume_id: str) -> Path:
        return self.store / volume_id / ".nbd" / volume_id

    @contextlib.contextmanager
    def servers(self, checkpoint: str) -> Iterator[None]:
        settings = parse_volume_settings({"storageUrl": f"file://{self.store}"})
        reader = brief_server(
            [str(STANDIN)], self.root / "source", SOURCE, settings, SECRETS,
            run_args=("--checkpoint", checkpoint),
        )  # fmt: skip
        writer = brief_server([str(STANDIN)], self.root / "target", TARGET, settings, SECRETS)
        with reader, writer:
            yield

    def copy(self, capacity: int, *extra: str) -> tuple[int, str]:
        """restore_copy's status and its termination message."""
        log = self.root / "termination-log"
        status = restore_copy.main(
            [
                "--source", str(self.root / "source"), "--source-export", SOURCE,
                "--target", str(self.root / "target"), "--target-export", TARGET,
                "--capacity-bytes", str(capacity), "--termination-log", str(log), *extra,
            ]
        )  # fmt: skip
        return status, log.read_text() if log.exists() else ""


@pytest.fixture
def pod() -> Iterator[Pod]:
    # Short: the servers' socket paths must fit a unix socket address.
    with tempfile.TemporaryDirectory(prefix="zr-") as directory:
        root = Path(directory)
        (root / "store").mkdir()
        yield Pod(root, root / "store")


def checkpointed(pod: Pod, name: str, offset: int, data: bytes) -> None:
    """The source volume with ``data`` at ``offset`` in its checkpoint ``name``, and
    other data written since."""
    export = pod.export(SOURCE)
    export.parent.mkdir(parents=True)
    with export.open("w+b") as f:
        f.truncate(SIZE)
        f.seek(offset)
        f.write(data)
    settings = parse_volume_settings({"storageUrl": f"file://{pod.store}"})
    with brief_server([str(STANDIN)], pod.root / "ck", SOURCE, settings, SECRETS) as server:
        server.admin.create(name)
    with export.open("r+b") as f:
        f.seek(offset)
        f.write(b"later" * (len(data) // 5))


def test_the_checkpoints_data_lands_in_a_larger_new_volume(
    pod: Pod, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b"as-of-the-checkpoint" * 1000
    checkpointed(pod, "snap-1", 3 * MiB, data)
    with pod.servers("snap-1"):
        status, message = pod.copy(2 * SIZE)
    assert (status, message) == (0, "")
    copied = pod.export(TARGET).read_bytes()
    assert len(copied) == 2 * SIZE
    assert copied[3 * MiB : 3 * MiB + len(data)] == data
    assert copied.count(0) == len(copied) - len(data) + data.count(0)
    printed = [restore_copy.progress_of(line) for line in capsys.readouterr().out.splitlines()]
    assert printed and printed[-1] == 100 and printed == sorted(printed), printed


@pytest.mark.parametrize(
    ("case", "capacity", "extra", "code", "needle"),
    [
        ("smaller than the source", SIZE // 2, (), "OUT_OF_RANGE", "more than the"),
        ("no servers", SIZE, ("--wait-seconds", "0.5"), "UNAVAILABLE", "did not answer"),
    ],
)
def test_a_failure_ends_with_its_code_in_the_termination_log(
    pod: Pod, case: str, capacity: int, extra: tuple[str, ...], code: str, needle: str
) -> None:
    checkpointed(pod, "snap-2", 0, b"x" * 4096)
    servers = pod.servers("snap-2") if case != "no servers" else contextlib.nullcontext()
    with servers:
        status, message = pod.copy(capacity, *extra)
    assert status == 1
    assert message.startswith(f"{code}: ") and needle in message, message


def test_an_unexpected_failure_is_internal_in_the_termination_log(tmp_path: Path) -> None:
    def job() -> str:
        raise PermissionError(13, "Permission denied", "/run/zerofs-job")

    log = tmp_path / "termination-log"
    assert job_program.run_job(job, str(log)) == 1
    assert log.read_text() == (
        "INTERNAL: the job failed: PermissionError: [Errno 13] Permission denied: '/run/zerofs-job'"
    )


def test_progress_lines_are_read_back() -> None:
    lines = ("progress 7", "progress 100", "progress 101", "something else")
    assert [restore_copy.progress_of(line) for line in lines] == [7, 100, None, None]


def test_the_checkpoint_job_creates_reports_and_deletes_a_checkpoint(pod: Pod) -> None:
    settings = parse_volume_settings({"storageUrl": f"file://{pod.store}"})
    log = pod.root / "termination-log"
    sockets = pod.root / "server"

    def job(*operation: str) -> tuple[int, str]:
        status = checkpoint_job.main(
            ["--sockets", str(sockets), "--volume", SOURCE, *operation,
             "--termination-log", str(log)]
        )  # fmt: skip
        return status, log.read_text()

    with brief_server([str(STANDIN)], sockets, SOURCE, settings, SECRETS) as server:
        status, message = job("--create", "snap-job")
        assert status == 0, message
        created = json.loads(message)
        (listed,) = server.admin.list()
        assert (created["id"], created["name"]) == (listed.id, "snap-job")
        assert created["createdAt"] == int(listed.created_at.timestamp())
        assert json.loads(job("--create", "snap-job")[1]) == created  # the one that exists
        assert job("--delete", "snap-job") == (0, "{}")
        assert server.admin.list() == []
        assert job("--delete", "snap-job") == (0, "{}")
    status, message = job("--create", "snap-job", "--wait-seconds", "0.5")
    assert status == 1 and message.startswith("UNAVAILABLE: ") and "did not answer" in message
