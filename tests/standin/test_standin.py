"""The ZeroFS stand-in (tools/zerofs-standin): config checks, serving, durability."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from standin.servers import (
    STANDIN,
    NbdClient,
    alive,
    cmdline,
    load_standin,
    nbd_list_exports,
    session_members,
    wait_for_socket,
    write_standin_config,
)
from zerofs_csi.nbd._nbd import (
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
)
from zerofs_csi.servers import ninep
from zerofs_csi.servers.zerofs_config import ENV_ENCRYPTION_PASSWORD, render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

standin = load_standin()


# ---------------------------------------------------------------------------------
# Config


def test_loads_the_config_the_driver_renders(tmp_path: Path) -> None:
    settings = VolumeSettings(
        storage_url=StorageUrl.parse(f"file://{tmp_path}/data"),
        compression="lz4",
        l0_max_ssts=8,
    )
    rendered = render_zerofs_config(
        settings,
        "pvc-1",
        VolumeSecrets(encryption_password="s3cret-pw"),
        cache_dir=str(tmp_path / "cache"),
        nbd_socket=str(tmp_path / "nbd.sock"),
        ninep_socket=str(tmp_path / "9p.sock"),
    )
    path = tmp_path / "config.toml"
    path.write_text(rendered.toml_text)

    config = standin.load_config(path, dict(rendered.secret_env))

    assert config == standin.StandinConfig(
        storage_dir=tmp_path / "data" / "pvc-1",
        cache_dir=tmp_path / "cache",
        nbd_socket=tmp_path / "nbd.sock",
        ninep_socket=tmp_path / "9p.sock",
    )


def test_loads_the_s3_config_the_driver_renders(tmp_path: Path) -> None:
    settings = VolumeSettings(
        storage_url=StorageUrl.parse("s3://bucket-1/base/path"),
        s3_endpoint="http://127.0.0.1:7480",
        s3_allow_http=True,
        s3_region="eu-west-3",
    )
    secrets = VolumeSecrets(
        encryption_password="pw",
        access_key_id="AKIDSTANDIN",
        secret_access_key="secret/standin+key",
        session_token="token-standin",
    )
    rendered = render_zerofs_config(
        settings,
        "pvc-1",
        secrets,
        cache_dir=str(tmp_path / "cache"),
        nbd_socket=str(tmp_path / "nbd.sock"),
        ninep_socket=str(tmp_path / "9p.sock"),
    )
    path = tmp_path / "config.toml"
    path.write_text(rendered.toml_text)

    config = standin.load_config(path, dict(rendered.secret_env))

    s3 = config.s3
    assert s3 is not None
    assert (s3.url, s3.bucket, s3.prefix) == (
        "s3://bucket-1/base/path/pvc-1",
        "bucket-1",
        "base/path/pvc-1",
    )
    assert (s3.endpoint, s3.region, s3.ignored_options) == (
        "http://127.0.0.1:7480",
        "eu-west-3",
        (),
    )
    assert s3.environment == {
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "AKIDSTANDIN",
        "AWS_SECRET_ACCESS_KEY": "secret/standin+key",
        "AWS_SESSION_TOKEN": "token-standin",
    }
    assert not any(secret in repr(config) for secret in ("AKIDSTANDIN", "secret/standin", "token-"))
    # The 9P tree is local, in the cache directory.
    assert config.storage_dir == tmp_path / "cache" / "standin-9p"
    assert s3.layout.size_key("pvc-1") == "base/path/pvc-1/.nbd/pvc-1"
    assert s3.layout.blocks_key("pvc-1") == "base/path/pvc-1/.nbd-blocks/pvc-1"


S3_STORAGE = '[storage]\nurl = "s3://bucket-1/p"\nencryption_password = "x"\n'


@pytest.mark.parametrize(
    ("aws", "environ", "expected"),
    [
        # object_store's from_env, then [aws] as aws_<key> over it.
        ("", {"AWS_ENDPOINT": "https://env.example"}, {"endpoint": "https://env.example"}),
        (
            'endpoint = "https://table.example"',
            {"AWS_ENDPOINT_URL": "https://env.example"},
            {"endpoint": "https://table.example"},
        ),
        (
            'endpoint_url_s3 = "https://s3.example"\nendpoint = "https://other.example"',
            {},
            {"endpoint": "https://s3.example"},
        ),
        ('default_region = "eu-1"', {}, {"region": "eu-1"}),
        ('default_region = "eu-1"\nregion = "eu-2"', {}, {"region": "eu-2"}),
        ("", {"AWS_REGION": "eu-3", "AWS_DEFAULT_REGION": "eu-4"}, {"region": "eu-3"}),
        ("", {}, {"region": "us-east-1", "endpoint": None}),
        ('endpoint = "http://h:1"\nallow_http = "Yes"', {}, {"endpoint": "http://h:1"}),
        (
            'virtual_hosted_style_request = "true"\nconditional_put = "redis://r"\nbogus = "1"',
            {},
            {
                "ignored_options": (
                    "aws.bogus",
                    "aws.conditional_put",
                    "aws.virtual_hosted_style_request",
                )
            },
        ),
        (
            'token = "t"\naccess_key_id = "a"\nsecret_access_key = "s"',
            {},
            {"environment": {"AWS_SESSION_TOKEN": "t"}},
        ),
        (
            "",
            {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"},
            {"environment": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}},
        ),
    ],
)
def test_s3_options_are_taken_as_zerofs_takes_them(
    tmp_path: Path, aws: str, environ: dict[str, str], expected: dict[str, object]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text(storage=S3_STORAGE) + f"[aws]\n{aws}\n")
    s3 = standin.load_config(path, {"PW": "pw", **environ}).s3
    assert s3 is not None
    for name, value in expected.items():
        if name == "environment":
            assert isinstance(value, dict)
            assert {key: s3.environment.get(key) for key in value} == value
        else:
            assert getattr(s3, name) == value


@pytest.mark.parametrize(
    ("aws", "message"),
    [
        ('endpoint = "http://h:1"', 'is plain http and [aws] allow_http is not "true"'),
        ('endpoint = "http://h:1"\nallow_http = "maybe"', "failed to parse 'maybe' as a boolean"),
        ('endpoint = "h:1"', "must be an http:// or https:// URL"),
        ('access_key_id = "a"', "[aws] secret_access_key is missing"),
        ('secret_access_key = "do-not-show"', "[aws] access_key_id is missing"),
    ],
)
def test_refuses_s3_options_zerofs_could_not_use(tmp_path: Path, aws: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text(storage=S3_STORAGE) + f"[aws]\n{aws}\n")
    with pytest.raises(standin.ConfigError) as caught:
        standin.load_config(path, {"PW": "pw"})
    assert message in str(caught.value)
    assert str(caught.value).startswith("s3://bucket-1/p: ")
    assert "do-not-show" not in str(caught.value)


VALID = {
    "cache": '[cache]\ndir = "/tmp/c"\ndisk_size_gb = 1\n',
    "storage": '[storage]\nurl = "file:///tmp/d"\nencryption_password = "${PW}"\n',
    "nbd": '[servers.nbd]\nunix_socket = "/tmp/n.sock"\n',
    "ninep": '[servers.ninep]\nunix_socket = "/tmp/9.sock"\n',
}


def config_text(**replace: str) -> str:
    return "\n".join(replace.get(name, text) for name, text in VALID.items())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (config_text() + "[bogus]\nx = 1\n", "unknown field `bogus`"),
        (config_text(nbd="", ninep=""), "missing field `servers`"),
        (config_text(cache='[cache]\ndir = "/c"\n'), "missing field `disk_size_gb` in [cache]"),
        (config_text(cache='[cache]\ndir = "/c"\ndisk_size_gb = 1\nsize = 2\n'), "`size`"),
        (config_text(cache='[cache]\ndir = "/c"\ndisk_size_gb = "1"\n'), "must be a number"),
        (
            config_text(storage='[storage]\nurl = "gs://b/p"\nencryption_password = "x"\n'),
            "serves file:// and s3:// storage (got gs://)",
        ),
        (
            config_text(storage='[storage]\nurl = "s3://b/p/../q"\nencryption_password = "x"\n'),
            "'..' segment",
        ),
        (
            config_text(storage='[storage]\nurl = "file://host/p"\nencryption_password = "x"\n'),
            "file:///absolute/path",
        ),
        (config_text() + '[servers.nfs]\naddresses = ["127.0.0.1:2049"]\n[servers.ftp]\n', "ftp"),
        (
            config_text(nbd='[servers.nbd]\naddresses = ["127.0.0.1:10809"]\n'),
            "serves only unix sockets",
        ),
        (config_text(ninep=""), "servers.ninep.unix_socket is required"),
        (config_text() + "[aws]\nallow_http = true\n", "[aws] values must all be strings"),
        (config_text() + '[aws]\nsecret_access_key = "${NOT_SET_ANYWHERE}"\n', "NOT_SET_ANYWHERE"),
        ("[cache\n", "Failed to parse config file"),
    ],
)
def test_refuses_what_zerofs_would_or_the_standin_cannot_serve(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(standin.ConfigError) as caught:
        standin.load_config(path, {"PW": "pw"})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("lsm", "sync_writes", "flush_interval_s"),
    [
        ("", False, 30),
        ("[lsm]\nsync_writes = true\n", True, 30),
        ("[lsm]\nflush_interval_secs = 12\n", False, 12),
        # ZeroFS raises an interval below its minimum to it.
        ("[lsm]\nflush_interval_secs = 1\n", False, 5),
    ],
)
def test_reads_when_writes_are_stored(
    tmp_path: Path, lsm: str, sync_writes: bool, flush_interval_s: int
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text() + lsm)
    config = standin.load_config(path, {"PW": "pw"})
    assert (config.sync_writes, config.flush_interval_s) == (sync_writes, flush_interval_s)


def test_unset_password_variable_is_an_error_that_names_it_not_its_value(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_text())
    with pytest.raises(standin.ConfigError) as caught:
        standin.load_config(path, {})
    assert "storage.encryption_password: environment variable PW is not set" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${A}/x", "1/x"),
        ("$A/x", "1/x"),
        ("${UNSET:-fallback}", "fallback"),
        ("${A:-fallback}", "1"),
        ("no variables", "no variables"),
        ("cost: 5$", "cost: 5$"),
    ],
)
def test_expands_variables_like_zerofs(value: str, expected: str) -> None:
    assert standin.expand_variables(value, {"A": "1"}, "key") == expected


def test_attach_name_rewrite_keeps_everything_else() -> None:
    frame = ninep.tattach(3, 0, "root", "", 0)
    rewritten = standin.rewrite_aname(frame, b"/srv/data")
    assert rewritten == ninep.tattach(3, 0, "root", "/srv/data", 0)
    assert struct.unpack_from("<I", rewritten)[0] == len(rewritten)
    walk = ninep.twalk(4, 0, 1, (".nbd",))
    assert standin.rewrite_aname(walk, b"/srv/data") == walk


# ---------------------------------------------------------------------------------
# Serving


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    config: Path
    storage: Path
    nbd: Path
    ninep: Path
    log: Path

    def children(self) -> dict[str, int]:
        """The stand-in's servers by program name (it runs in a session of its own)."""
        pids = [pid for pid in session_members(self.process.pid) if pid != self.process.pid]
        return {Path(cmdline(pid)[0]).name: pid for pid in pids}


def start_standin(
    tmp_path: Path, *, env: dict[str, str] | None = None, user: str | None = None
) -> Running:
    storage = tmp_path / "data" / "pvc-1"
    config = write_standin_config(
        tmp_path / "config.toml",
        storage_dir=storage,
        nbd_socket=tmp_path / "run" / "nbd.sock",
        ninep_socket=tmp_path / "run" / "9p.sock",
        cache_dir=tmp_path / "cache",
    )
    log = tmp_path / "standin.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(STANDIN), "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            env=env if env is not None else {**os.environ, "STANDIN_TEST_PASSWORD": "pw"},
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    running = Running(
        process, config, storage, tmp_path / "run" / "nbd.sock", tmp_path / "run" / "9p.sock", log
    )
    wait_for_socket(running.nbd)
    return running


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    running = start_standin(tmp_path)
    yield running
    if running.process.poll() is None:
        running.process.terminate()
        running.process.wait(10)


def test_serves_the_same_directory_over_9p_and_nbd(server: Running) -> None:
    # The node's call exactly: aname "" (ZeroFS ignores it; the relay rewrites it).
    assert ninep.prepare_export(server.ninep, "pvc-1", 8 << 20).size_bytes == 8 << 20
    assert (server.storage / ".nbd" / "pvc-1").stat().st_size == 8 << 20

    assert nbd_list_exports(server.nbd)[1] == ["pvc-1"]
    with NbdClient(server.nbd, "pvc-1") as nbd:
        assert nbd.size == 8 << 20
        # What the attach path relies on: 4 connections when CAN_MULTI_CONN.
        wanted = NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN
        assert nbd.flags & wanted == wanted

    # A grown export is seen by the next connection, as with ZeroFS.
    ninep.prepare_export(server.ninep, "pvc-1", 16 << 20)
    with NbdClient(server.nbd, "pvc-1") as nbd:
        assert nbd.size == 16 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the stand-in as another user")
def test_serves_9p_to_the_node_when_run_as_a_user_as_in_zerofs_image() -> None:
    """ZeroFS's image runs as its own user (uid 1001, named in its /etc/passwd), and so
    does the per-volume pod: diod, not root, must still attach the node's session."""
    with tempfile.TemporaryDirectory(dir="/tmp") as home:
        shutil.chown(home, "daemon", "daemon")
        running = start_standin(Path(home), user="daemon")
        try:
            assert ninep.prepare_export(running.ninep, "pvc-1", 8 << 20).size_bytes == 8 << 20
            export = running.storage / ".nbd" / "pvc-1"
            assert export.stat().st_uid == pwd.getpwnam("daemon").pw_uid
        finally:
            running.process.terminate()
            running.process.wait(10)


def test_connections_see_each_others_flushed_writes(server: Running) -> None:
    ninep.prepare_export(server.ninep, "pvc-1", 1 << 20)
    with NbdClient(server.nbd, "pvc-1") as first, NbdClient(server.nbd, "pvc-1") as second:
        first.write(4096, b"multi-conn" * 100)
        first.flush()
        assert second.read(4096, 1000) == b"multi-conn" * 100


def test_flushed_data_survives_kill_9_and_restart(tmp_path: Path) -> None:
    running = start_standin(tmp_path)
    try:
        ninep.prepare_export(running.ninep, "pvc-1", 4 << 20)
        data = os.urandom(256 << 10)
        with NbdClient(running.nbd, "pvc-1") as nbd:
            nbd.write(1 << 20, data[: 128 << 10])
            nbd.flush()
            nbd.write((1 << 20) + (128 << 10), data[128 << 10 :], fua=True)
        children = list(running.children().values())
        assert len(children) == 2

        running.process.kill()
        running.process.wait(10)
        # Its servers die with it (PR_SET_PDEATHSIG with SIGKILL).
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children):
            assert time.monotonic() < deadline, "the stand-in's servers outlived it"
            time.sleep(0.05)
        assert running.nbd.exists()  # a kill -9 leaves the socket; the next start clears it
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()

    again = start_standin(tmp_path)
    try:
        with NbdClient(again.nbd, "pvc-1") as nbd:
            assert nbd.read(1 << 20, 256 << 10) == data
    finally:
        again.process.terminate()
        again.process.wait(10)


def test_sigterm_stops_both_servers_and_removes_the_sockets(server: Running) -> None:
    children = list(server.children().values())
    assert len(children) == 2

    server.process.send_signal(signal.SIGTERM)

    assert server.process.wait(10) == 0
    assert not any(alive(pid) for pid in children)
    assert not server.nbd.exists() and not server.ninep.exists()
    assert "SIGTERM: stopping" in server.log.read_text()


@pytest.mark.parametrize("which", ["diod", "nbdkit"])
def test_a_dead_server_makes_the_standin_exit_non_zero(server: Running, which: str) -> None:
    children = server.children()
    assert sorted(children) == ["diod", "nbdkit"]
    os.kill(children[which], signal.SIGKILL)

    assert server.process.wait(10) == 1
    assert not any(alive(pid) for pid in children.values())
    assert not server.nbd.exists() and not server.ninep.exists()
    # Unexpectedly, or while starting if the stand-in had not seen nbdkit listen yet.
    assert f"{which} exited" in server.log.read_text()


def test_config_error_exits_1_without_showing_the_password(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        config_text(storage='[storage]\nurl = "gs://b/p"\nencryption_password = "${PW}"\n')
    )
    result = subprocess.run(
        [str(STANDIN), "run", "-c", str(config)],
        env={**os.environ, "PW": "pw-visible-nowhere", ENV_ENCRYPTION_PASSWORD: "x"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "config error: storage.url: the stand-in serves file:// and s3:// storage" in (
        result.stderr
    )
    assert "pw-visible-nowhere" not in result.stderr + result.stdout
