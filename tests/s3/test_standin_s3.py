"""The ZeroFS stand-in on s3:// storage, against a real S3 server (Ceph radosgw).

The stand-in is started on the config the driver renders for an s3:// StorageClass,
credentials in the environment exactly as the driver hands them over. Its NBD export is
driven by real clients (libnbd's nbdinfo and nbdcopy, and the tests' own NBD client for
unaligned writes and WRITE_ZEROES); the bucket is then listed to see where the data went.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from radosgw import RadosGateway
from standin.servers import (
    STANDIN,
    NbdClient,
    alive,
    cmdline,
    environ,
    load_standin,
    require_tool,
    session_members,
)

from zerofs_csi.bench.plugin import free_tcp_port as free_port
from zerofs_csi.controller.s3cleanup import delete_volume_data
from zerofs_csi.nbd._nbd import ExportNotFound
from zerofs_csi.servers import ninep
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

pytestmark = pytest.mark.s3

VOLUME = "pvc-1"
PREFIX = f"base/{VOLUME}/"
MiB = 1 << 20
# The S3 object size of the exports' blocks.
OBJECT = load_standin().OBJECT_SIZE
# Objects of other volumes and of nobody, which the stand-in must never touch.
BYSTANDERS = {
    "base/pvc-10/.nbd/pvc-10": b"1048576",
    "base/pvc-1x/manifest": b"neighbour",
    "other/pvc-1/manifest": b"same id, other base path",
    "root-object": b"bucket root",
}
START_TIMEOUT_S = 60.0


def settings_for(gateway: RadosGateway, bucket: str, **changes: Any) -> VolumeSettings:
    settings = VolumeSettings(
        storage_url=StorageUrl("s3", bucket, "base"),
        s3_endpoint=gateway.endpoint,
        s3_allow_http=True,
        s3_region=gateway.region,
        delete_data_on_pvc_delete=True,
    )
    return replace(settings, **changes)


def secrets_for(gateway: RadosGateway, **changes: Any) -> VolumeSecrets:
    secrets = VolumeSecrets(
        encryption_password="standin-s3-password",
        access_key_id=gateway.access_key,
        secret_access_key=gateway.secret_key,
    )
    return replace(secrets, **changes)


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


@dataclass
class Standin:
    """One stand-in process for the volume, started on the driver's rendered config."""

    directory: Path
    settings: VolumeSettings
    secrets: VolumeSecrets
    process: subprocess.Popen[bytes] | None = None

    @property
    def nbd(self) -> Path:
        return self.directory / "run" / "nbd.sock"

    @property
    def ninep(self) -> Path:
        return self.directory / "run" / "9p.sock"

    @property
    def cache(self) -> Path:
        return self.directory / "cache"

    @property
    def log(self) -> Path:
        return self.directory / "standin.log"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{VOLUME}?socket={self.nbd}"

    def launch(self) -> subprocess.Popen[bytes]:
        rendered = render_zerofs_config(
            self.settings,
            VOLUME,
            self.secrets,
            cache_dir=str(self.cache),
            nbd_socket=str(self.nbd),
            ninep_socket=str(self.ninep),
        )
        config = self.directory / "config.toml"
        config.write_text(rendered.toml_text)
        environment = {"PATH": os.environ["PATH"], **rendered.secret_env}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(STANDIN), "run", "-c", str(config)],
                stdout=out,
                stderr=out,
                env=environment,
                start_new_session=True,
            )
        return self.process

    def start(self) -> None:
        process = self.launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        # A killed stand-in leaves its socket files: wait for both to answer.
        while not (answers(self.nbd) and answers(self.ninep)):
            assert process.poll() is None, f"the stand-in exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"no sockets yet: {self.log.read_text()}"
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 of the stand-in; its servers die with it."""
        assert self.process is not None
        children = [pid for pid in session_members(self.process.pid) if pid != self.process.pid]
        self.process.kill()
        self.process.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, "the stand-in's servers outlived it"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def bystanders(s3: Any, bucket: str) -> dict[str, bytes]:
    for key, body in BYSTANDERS.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return BYSTANDERS


@pytest.fixture
def standin(
    tmp_path: Path, radosgw: RadosGateway, bucket: str, bystanders: dict[str, bytes]
) -> Iterator[Standin]:
    require_tool("nbdkit")
    running = Standin(tmp_path, settings_for(radosgw, bucket), secrets_for(radosgw))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def objects(s3: Any, bucket: str) -> dict[str, bytes]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            found[entry["Key"]] = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
    return found


def assert_only_under_the_prefix(s3: Any, bucket: str, bystanders: dict[str, bytes]) -> set[str]:
    """Every object is the volume's or an untouched bystander; returns the volume's keys."""
    found = objects(s3, bucket)
    strangers = {key for key in found if key not in bystanders and not key.startswith(PREFIX)}
    assert not strangers, f"objects outside {PREFIX}: {sorted(strangers)}"
    assert {key: found.get(key) for key in bystanders} == bystanders
    return {key for key in found if key.startswith(PREFIX)}


def nbdinfo_size(uri: str) -> int:
    nbdinfo = require_tool("nbdinfo")
    result = subprocess.run(
        [nbdinfo, "--size", uri], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def nbdcopy(source: str, destination: str) -> None:
    result = subprocess.run(
        [require_tool("nbdcopy"), "--flush", source, destination],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def write_random(standin: Standin, size: int) -> bytes:
    """Fills the export from offset 0 with random bytes through nbdcopy."""
    data = os.urandom(size)
    source = standin.directory / "written.bin"
    source.write_bytes(data)
    nbdcopy(str(source), standin.uri)
    return data


def read_all(standin: Standin) -> bytes:
    copy = standin.directory / "read.bin"
    copy.unlink(missing_ok=True)
    nbdcopy(standin.uri, str(copy))
    return copy.read_bytes()


def test_serves_an_export_whose_blocks_are_objects_under_the_volume_prefix(
    standin: Standin, s3: Any, bucket: str, bystanders: dict[str, bytes]
) -> None:
    # The node's own calls: the export file over 9P, then NBD.
    created = ninep.prepare_export(standin.ninep, VOLUME, 8 * MiB)
    assert created.created and created.size_bytes == 8 * MiB
    assert nbdinfo_size(standin.uri) == 8 * MiB

    data = write_random(standin, 6 * MiB + 4096)
    assert read_all(standin)[: len(data)] == data

    keys = assert_only_under_the_prefix(s3, bucket, bystanders)
    # The size record and one object per block written (the last one partly written).
    assert f"{PREFIX}.nbd/{VOLUME}" in keys
    blocks = sorted(key for key in keys if key.startswith(f"{PREFIX}.nbd-blocks/{VOLUME}/"))
    assert len(blocks) == 6 * MiB // OBJECT + 1, blocks
    assert objects(s3, bucket)[f"{PREFIX}.nbd/{VOLUME}"] == str(8 * MiB).encode()

    # A grown export is seen by the next connection and recorded in S3 as well.
    ninep.prepare_export(standin.ninep, VOLUME, 16 * MiB)
    assert nbdinfo_size(standin.uri) == 16 * MiB
    assert objects(s3, bucket)[f"{PREFIX}.nbd/{VOLUME}"] == str(16 * MiB).encode()


def test_data_outlives_kill_9_and_the_loss_of_every_local_file(
    standin: Standin, s3: Any, bucket: str, bystanders: dict[str, bytes]
) -> None:
    ninep.prepare_export(standin.ninep, VOLUME, 4 * MiB)
    data = write_random(standin, 4 * MiB)
    standin.kill()
    # A new pod on another node: nothing local survives, not even the cache directory.
    shutil.rmtree(standin.cache)

    standin.start()
    # The export file is back at its size before anyone creates it: a stage would see an
    # existing export (not a fresh one it may format) and find its filesystem.
    assert ninep.export_size(standin.ninep, VOLUME) == 4 * MiB
    again = ninep.prepare_export(standin.ninep, VOLUME, 4 * MiB)
    assert not again.created
    assert read_all(standin) == data
    assert_only_under_the_prefix(s3, bucket, bystanders)


def test_unaligned_writes_and_write_zeroes_read_back_exactly(standin: Standin) -> None:
    ninep.prepare_export(standin.ninep, VOLUME, 4 * MiB)
    expected = bytearray(os.urandom(4 * MiB))
    with NbdClient(standin.nbd, VOLUME) as writer, NbdClient(standin.nbd, VOLUME) as reader:
        writer.write(0, bytes(expected))
        # Across an object boundary, inside one object, and a single sector at the end.
        for offset, length in (
            (MiB - 1000, 5000),
            (2 * MiB + 512, 4096),
            (4 * MiB - 512, 512),
        ):
            chunk = os.urandom(length)
            writer.write(offset, chunk, fua=True)
            expected[offset : offset + length] = chunk
        # WRITE_ZEROES that may trim, over whole objects and two partial ones: every
        # byte of the range reads back as zero, every byte around it is kept.
        start, length = OBJECT // 2, 3 * OBJECT
        writer.zero(start, length, may_trim=True)
        expected[start : start + length] = bytes(length)
        writer.zero(3 * MiB + 100, 1000, may_trim=False)
        expected[3 * MiB + 100 : 3 * MiB + 1100] = bytes(1000)
        writer.flush()
        # Another connection (CAN_MULTI_CONN) reads what the first one wrote.
        assert reader.read(0, 4 * MiB) == bytes(expected)


def test_deleting_the_prefix_with_s3cleanup_leaves_only_the_others(
    standin: Standin, s3: Any, bucket: str, bystanders: dict[str, bytes]
) -> None:
    ninep.prepare_export(standin.ninep, VOLUME, 4 * MiB)
    write_random(standin, 3 * MiB)
    assert len(assert_only_under_the_prefix(s3, bucket, bystanders)) > 1
    standin.stop()

    deleted = delete_volume_data(standin.settings, VOLUME, standin.secrets)

    assert deleted == 1 + 3 * MiB // OBJECT  # the size record and the blocks
    assert objects(s3, bucket) == bystanders
    # Started again on the emptied prefix, the volume has no export any more.
    standin.start()
    with pytest.raises(ExportNotFound):
        NbdClient(standin.nbd, VOLUME)
    assert ninep.export_size(standin.ninep, VOLUME) is None


def test_credentials_never_appear_on_a_command_line(standin: Standin) -> None:
    assert standin.process is not None
    members = session_members(standin.process.pid)
    programs = {Path(cmdline(pid)[0]).name: pid for pid in members}
    assert {"nbdkit", "diod"} <= set(programs)
    secrets = (standin.secrets.secret_access_key, standin.secrets.access_key_id)
    for pid in members:
        assert not any(secret in " ".join(cmdline(pid)) for secret in secrets if secret)
    # nbdkit's S3 client takes them from its environment; diod gets none of them.
    assert environ(programs["nbdkit"])["AWS_SECRET_ACCESS_KEY"] == standin.secrets.secret_access_key
    assert not set(environ(programs["diod"])) & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unreachable endpoint", "cannot reach the S3 endpoint http://127.0.0.1:"),
        ("missing bucket", "bucket no-such-bucket-here does not exist"),
        ("wrong secret key", "S3 refused the credentials (SignatureDoesNotMatch)"),
        ("http without allow_http", "allow_http"),
        ("no credentials", "no S3 credentials"),
    ],
)
def test_wrong_or_unreachable_s3_is_a_clear_error_at_start(
    tmp_path: Path, radosgw: RadosGateway, bucket: str, case: str, expected: str
) -> None:
    require_tool("nbdkit")
    settings = settings_for(radosgw, bucket)
    secrets = secrets_for(radosgw)
    if case == "unreachable endpoint":
        settings = replace(settings, s3_endpoint=f"http://127.0.0.1:{free_port()}")
    elif case == "missing bucket":
        settings = replace(settings, storage_url=StorageUrl("s3", "no-such-bucket-here", "base"))
    elif case == "wrong secret key":
        secrets = replace(secrets, secret_access_key="not-the-" + radosgw.secret_key)
    elif case == "no credentials":
        secrets = replace(secrets, access_key_id=None, secret_access_key=None)
    else:
        settings = replace(settings, s3_allow_http=False)
    standin = Standin(tmp_path, settings, secrets)

    started = time.monotonic()
    process = standin.launch()
    try:
        status = process.wait(START_TIMEOUT_S)
    finally:
        standin.stop()
    log = standin.log.read_text()

    assert status == 1, log
    assert time.monotonic() - started < START_TIMEOUT_S
    assert expected in log
    assert f"s3://{settings.storage_url.bucket}/base/{VOLUME}" in log
    for secret in (radosgw.secret_key, radosgw.access_key, secrets.encryption_password):
        assert secret not in log
    assert not standin.nbd.exists() and not standin.ninep.exists()


# Writes are made over objects already stored: the first four, flushed.
STORED_OBJECTS = 4


@dataclass(frozen=True)
class Durability:
    """A write answered by the stand-in, what follows it, and how the stand-in ends."""

    write: str  # "unaligned": 3000 bytes across objects 1 and 2; "zero": object 2 whole
    then: str  # "nothing", "flush" (NBD_CMD_FLUSH) or "periodic flush" (waited for)
    end: str  # "kill -9" or "SIGTERM"
    kept: bool  # the write reads back from the next stand-in
    stored_at_once: bool = False  # in S3 as soon as it is answered
    fua: bool = False
    sync_writes: bool = False
    flush_interval_secs: int | None = None


DURABILITY = {
    "answered, then kill -9: lost": Durability("unaligned", "nothing", "kill -9", kept=False),
    "flushed, then kill -9": Durability("unaligned", "flush", "kill -9", kept=True),
    "answered, then SIGTERM (the final flush)": Durability(
        "unaligned", "nothing", "SIGTERM", kept=True
    ),
    "sync_writes, answered, then kill -9": Durability(
        "unaligned", "nothing", "kill -9", kept=True, stored_at_once=True, sync_writes=True
    ),
    "FUA, then kill -9": Durability(
        "unaligned", "nothing", "kill -9", kept=True, stored_at_once=True, fua=True
    ),
    "answered, periodic flush, then kill -9": Durability(
        "unaligned", "periodic flush", "kill -9", kept=True, flush_interval_secs=5
    ),
    "object zeroed whole, then kill -9: lost": Durability("zero", "nothing", "kill -9", kept=False),
    "object zeroed whole, flushed: deleted": Durability("zero", "flush", "kill -9", kept=True),
}


def stored_image(s3: Any, bucket: str) -> bytes:
    """The export's first objects as S3 holds them, an absent one as zeroes."""
    image = bytearray()
    for block in range(STORED_OBJECTS):
        key = f"{PREFIX}.nbd-blocks/{VOLUME}/{block:016x}"
        try:
            image += s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            image += bytes(OBJECT)
    return bytes(image)


def dirty_files(standin: Standin) -> list[Path]:
    return [path for path in (standin.cache / "write-back").rglob("*") if path.is_file()]


@pytest.mark.parametrize("case", DURABILITY.values(), ids=DURABILITY.keys())
def test_an_answered_write_is_stored_at_a_flush_as_zerofs_stores_it(
    case: Durability, tmp_path: Path, radosgw: RadosGateway, s3: Any, bucket: str
) -> None:
    """As ZeroFS 2.3: an answered write is durable once flushed (NBD flush, FUA, the
    periodic flush, the final flush of a graceful stop) or with sync_writes, and a kill
    -9 loses it otherwise: the next stand-in discards what the dead one never stored."""
    require_tool("nbdkit")
    settings = settings_for(
        radosgw,
        bucket,
        sync_writes=case.sync_writes,
        flush_interval_secs=case.flush_interval_secs,
    )
    standin = Standin(tmp_path, settings, secrets_for(radosgw))
    standin.start()
    try:
        ninep.prepare_export(standin.ninep, VOLUME, 4 * MiB)
        before = os.urandom(STORED_OBJECTS * OBJECT)
        after = bytearray(before)
        with NbdClient(standin.nbd, VOLUME) as nbd:
            nbd.write(0, before)
            nbd.flush()
            assert stored_image(s3, bucket) == before
            if case.write == "unaligned":
                offset, data = 2 * OBJECT - 1000, os.urandom(3000)
                nbd.write(offset, data, fua=case.fua)
            else:
                offset, data = 2 * OBJECT, bytes(OBJECT)
                nbd.zero(offset, OBJECT)
            after[offset : offset + len(data)] = data
            assert nbd.read(0, len(after)) == after
            assert stored_image(s3, bucket) == (after if case.stored_at_once else before)
            if case.then == "flush":
                nbd.flush()
            elif case.then == "periodic flush":
                deadline = time.monotonic() + 4 * (case.flush_interval_secs or 0)
                while stored_image(s3, bucket) != after or dirty_files(standin):
                    assert time.monotonic() < deadline, "no periodic flush"
                    time.sleep(0.5)
        areas = standin.cache / "write-back"
        dead_life = list(areas.iterdir()) if areas.exists() else []
        assert len(dead_life) == (0 if case.sync_writes else 1)
        if case.end == "SIGTERM":
            standin.stop()
            assert standin.process is not None and standin.process.returncode == 0
            assert "final flush: 2 objects stored" in standin.log.read_text()
        else:
            standin.kill()
            assert all(life.is_dir() for life in dead_life)

        standin.start()
        expected = after if case.kept else before
        with NbdClient(standin.nbd, VOLUME) as nbd:
            assert nbd.read(0, len(expected)) == expected
        assert stored_image(s3, bucket) == expected
        assert not any(life.exists() for life in dead_life)
        log = standin.log.read_text()
        lost = "never flushed before the previous server died: those writes are lost"
        assert (lost in log) == (not case.kept), log
        if case.write == "zero" and case.kept:
            # Stored as the S3 plugin stores a zeroed object: deleted.
            key = f"{PREFIX}.nbd-blocks/{VOLUME}/{2:016x}"
            with pytest.raises(s3.exceptions.ClientError):
                s3.head_object(Bucket=bucket, Key=key)
    finally:
        standin.stop()
