"""The local process backend running real servers on the host (no kernel NBD needed).

Every test runs with the ZeroFS stand-in (tools/zerofs-standin: nbdkit + diod) on
``file://`` storage under the test's temporary directory. A real ZeroFS 2.3 refuses
``file://`` for a writable server (no conditional put): tests/s3/test_real_zerofs.py runs
the backend with it on a MinIO bucket.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin.servers import (
    STANDIN,
    alive,
    cmdline,
    environ,
    nbd_list_exports,
    session_members,
)

from zerofs_csi import errors
from zerofs_csi.bench.plugin import wait_until
from zerofs_csi.observability.sanitize import MASK
from zerofs_csi.servers import lives, ninep
from zerofs_csi.servers.local import ProcessBackend, nbd_server_answers
from zerofs_csi.servers.zerofs_config import ENV_ENCRYPTION_PASSWORD
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

PASSWORD = "pw-Zq8-never-shown"
VOLUME = "pvc-test-1"
COMMANDS = {"standin": [str(STANDIN)]}


def file_storage(directory: Path) -> StorageUrl:
    """``file:///<directory>``: ZeroFS's local filesystem store, served by both."""
    return StorageUrl.parse(f"file://{directory}")


def settings_for(tmp_path: Path, **overrides: object) -> VolumeSettings:
    values: dict[str, object] = {
        "storage_url": file_storage(tmp_path / "data"),
        "pod_ready_timeout_seconds": 20,
    }
    values.update(overrides)
    return VolumeSettings(**values)  # type: ignore[arg-type]


SECRETS = VolumeSecrets(encryption_password=PASSWORD)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in "\0".join(cmdline(int(entry.name))) and alive(int(entry.name)):
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


@pytest.fixture(params=sorted(COMMANDS))
def command(request: pytest.FixtureRequest) -> list[str]:
    return COMMANDS[request.param]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def backend(state_dir: Path, command: list[str], tmp_path: Path) -> Iterator[ProcessBackend]:
    instance = ProcessBackend(
        state_dir,
        command=command,
        stop_timeout=5,
        restart_backoff=(0.1, 1.0),
        supervise_interval=0.05,
    )
    yield instance
    stop_everything(instance)
    assert processes_mentioning(str(tmp_path)) == []


def stop_everything(instance: ProcessBackend) -> None:
    for volume_id in instance.running():
        instance.stop(volume_id)
    instance.close()


def test_ensure_starts_a_server_that_speaks_nbd_and_9p(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path
) -> None:
    sockets = backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)

    assert sockets == backend.sockets(VOLUME)
    assert stat.S_ISSOCK(sockets.nbd.stat().st_mode)
    assert ninep.prepare_export(sockets.ninep, VOLUME, 64 << 20).size_bytes == 64 << 20
    flags, exports = nbd_list_exports(sockets.nbd)
    assert flags & 1  # NBD_FLAG_FIXED_NEWSTYLE
    assert exports == [VOLUME]
    assert backend.running() == [VOLUME]

    server_dir = state_dir / "servers" / VOLUME
    assert stat.S_IMODE(server_dir.stat().st_mode) == 0o700
    for name in ("config.toml", "secrets.json", "server.json", "server.log"):
        assert stat.S_IMODE((server_dir / name).stat().st_mode) == 0o600, name
    config = (server_dir / "config.toml").read_text()
    assert str(sockets.nbd) in config and str(sockets.ninep) in config
    assert f"file://{tmp_path}/data/{VOLUME}" in config
    state = json.loads((server_dir / "server.json").read_text())
    assert state["pid"] == backend.pid(VOLUME) and state["start_time"] > 0


def test_ensure_twice_reuses_the_running_server(backend: ProcessBackend, tmp_path: Path) -> None:
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    pid = backend.pid(VOLUME)

    started = time.monotonic()
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)

    assert time.monotonic() - started < 1.0
    assert backend.pid(VOLUME) == pid
    assert backend.restarts(VOLUME) == 0


@pytest.mark.parametrize(
    ("change", "secrets"),
    [
        ({"cache_disk_size_gb": 2.0}, SECRETS),
        ({"rust_log": "debug"}, SECRETS),
        ({}, VolumeSecrets(encryption_password=PASSWORD + "-rotated")),
    ],
    ids=["config", "environment", "secret"],
)
def test_a_changed_config_replaces_the_server(
    backend: ProcessBackend, tmp_path: Path, change: dict[str, object], secrets: VolumeSecrets
) -> None:
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    old_pid = backend.pid(VOLUME)
    assert old_pid is not None

    sockets = backend.ensure(VOLUME, settings_for(tmp_path, **change), secrets)

    new_pid = backend.pid(VOLUME)
    assert new_pid is not None and new_pid != old_pid
    assert not alive(old_pid) and session_members(old_pid) == []
    # Stopped with SIGTERM, it shut down gracefully: nothing it answered is lost.
    assert [life.status for life in lives.read_lives(sockets.directory)] == [0, None]
    assert lives.lost_writes(sockets.directory, 1) is None
    assert nbd_list_exports(sockets.nbd)[0] & 1
    if "cache_disk_size_gb" in change:
        config = (tmp_path / "state" / "servers" / VOLUME / "config.toml").read_text()
        assert "disk_size_gb = 2.0" in config


def test_killed_server_is_restarted_by_the_supervisor(
    backend: ProcessBackend, tmp_path: Path
) -> None:
    sockets = backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    ninep.prepare_export(sockets.ninep, VOLUME, 1 << 20)
    old_pid = backend.pid(VOLUME)
    assert old_pid is not None
    members = session_members(old_pid)

    os.kill(old_pid, signal.SIGKILL)

    wait_until(lambda: backend.pid(VOLUME) not in (None, old_pid), 15.0, "restart")
    wait_until(lambda: sockets.nbd.exists(), 15.0, "NBD socket")
    wait_until(lambda: nbd_list_exports(sockets.nbd)[1] == [VOLUME], 15.0, "NBD answer")
    assert backend.restarts(VOLUME) == 1
    # The killed server's own children went with it.
    wait_until(lambda: not any(alive(pid) for pid in members), 15.0, "children gone")
    # Its end is on record before the next one started: a device attached to it is not
    # connected to the next one.
    first, second = lives.read_lives(sockets.directory)
    assert first.status == 128 + signal.SIGKILL and not second.exited
    assert "killed by SIGKILL" in (lives.lost_writes(sockets.directory, 1) or "")
    assert lives.lost_writes(sockets.directory, 2) is None


def test_restart_delays_grow_and_stay_bounded(
    state_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ProcessBackend(
        state_dir, command=[str(STANDIN)], restart_backoff=(0.2, 0.5), supervise_interval=0.02
    )
    try:
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        caplog.set_level(logging.WARNING, logger="zerofs_csi.servers.local")
        for restarts in (1, 2, 3):
            pid = backend.pid(VOLUME)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda r=restarts: backend.restarts(VOLUME) == r, 15.0, "restart")
        delays = [r.restart_in for r in caplog.records if hasattr(r, "restart_in")]
        assert delays == [0.2, 0.4, 0.5]
    finally:
        backend.stop(VOLUME)
        backend.close()


PLUGIN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from zerofs_csi.servers.local import ProcessBackend
    from zerofs_csi.volume.secrets import VolumeSecrets
    from zerofs_csi.volume.settings import VolumeSettings
    from zerofs_csi.volume.storage_url import StorageUrl

    state, data, command, volume = sys.argv[1:5]
    backend = ProcessBackend(Path(state), command=[command])
    settings = VolumeSettings(
        storage_url=StorageUrl.parse("file://" + data),
        pod_ready_timeout_seconds=20,
    )
    backend.ensure(volume, settings, VolumeSecrets(encryption_password=sys.argv[5]))
    print(backend.pid(volume), flush=True)
    time.sleep(600)
    """
)


def run_plugin_and_kill_it(state_dir: Path, tmp_path: Path, command: list[str]) -> int:
    """Run a node plugin in a child Python that ensures VOLUME, then kill -9 it.
    Returns the server's pid, which must outlive the plugin."""
    plugin = subprocess.Popen(
        [sys.executable, "-c", PLUGIN, str(state_dir), str(tmp_path / "data"), command[0]]
        + [VOLUME, PASSWORD],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert plugin.stdout is not None
        server_pid = int(plugin.stdout.readline())
    finally:
        plugin.kill()
        plugin.wait()
        if plugin.stdout is not None:
            plugin.stdout.close()
    assert alive(server_pid)
    return server_pid


def test_new_instance_adopts_servers_after_plugin_kill(
    state_dir: Path, tmp_path: Path, command: list[str]
) -> None:
    server_pid = run_plugin_and_kill_it(state_dir, tmp_path, command)
    members = session_members(server_pid)
    assert server_pid in members

    backend = ProcessBackend(state_dir, command=command, supervise_interval=0.05)
    try:
        assert backend.running() == [VOLUME]
        assert backend.pid(VOLUME) == server_pid
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        assert backend.pid(VOLUME) == server_pid  # same config: adopted, not replaced

        backend.stop(VOLUME)

        assert backend.running() == []
        wait_until(lambda: not any(alive(pid) for pid in members), 10, "adopted server gone")
        assert not backend.sockets(VOLUME).directory.exists()
    finally:
        backend.close()
    assert processes_mentioning(str(tmp_path)) == []


def test_server_that_died_while_no_plugin_ran_is_restarted(
    state_dir: Path, tmp_path: Path, command: list[str]
) -> None:
    server_pid = run_plugin_and_kill_it(state_dir, tmp_path, command)
    os.kill(server_pid, signal.SIGKILL)
    wait_until(lambda: not alive(server_pid), 15.0, "server dead")

    backend = ProcessBackend(state_dir, command=command, supervise_interval=0.05)
    try:
        assert backend.running() == [VOLUME]
        wait_until(lambda: backend.pid(VOLUME) not in (None, server_pid), 15.0, "restart")
        sockets = backend.sockets(VOLUME)
        wait_until(lambda: sockets.nbd.exists(), 15.0, "NBD socket")
        wait_until(lambda: nbd_list_exports(sockets.nbd)[0] & 1, 15.0, "NBD answer")
        assert backend.restarts(VOLUME) == 1
        # Nobody saw how it ended.
        recorded = [(life.exited, life.status) for life in lives.read_lives(sockets.directory)]
        assert recorded == [(True, None), (False, None)]
        assert "nobody watched" in (lives.lost_writes(sockets.directory, 1) or "")
    finally:
        backend.stop(VOLUME)
        backend.close()
    assert processes_mentioning(str(tmp_path)) == []


def test_stop_is_idempotent_and_leaves_no_process(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path
) -> None:
    sockets = backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    ninep.prepare_export(sockets.ninep, VOLUME, 1 << 20)
    pid = backend.pid(VOLUME)
    assert pid is not None
    members = session_members(pid)
    assert pid in members

    backend.stop(VOLUME)

    assert not any(alive(member) for member in members)
    assert backend.running() == [] and backend.pid(VOLUME) is None
    assert not sockets.directory.exists()
    server_dir = state_dir / "servers" / VOLUME
    assert sorted(p.name for p in server_dir.iterdir()) == ["server.log"]
    # The volume's data is never touched.
    assert (tmp_path / "data" / VOLUME / ".nbd" / VOLUME).stat().st_size == 1 << 20

    backend.stop(VOLUME)
    backend.stop("pvc-never-started")
    assert backend.running() == []


def nbd_serving_script(path: Path, before: str = "", after: str = "") -> Path:
    """A shell "ZeroFS" that serves NBD with nbdkit on the socket its config names, with
    ``before`` and ``after`` the lines around starting nbdkit; it then waits."""
    lines = [
        "#!/bin/sh",
        before,
        'sock=$(sed -n \'/servers.nbd/,/unix_socket/s/.*"\\(.*\\)"/\\1/p\' "$3")',
        'nbdkit --foreground --unix "$sock" memory 1M &',
        after,
        "wait",
    ]
    path.write_text("\n".join(line for line in lines if line) + "\n")
    path.chmod(0o755)
    return path


def test_stop_kills_a_server_that_ignores_sigterm(state_dir: Path, tmp_path: Path) -> None:
    # A server that serves NBD (nbdkit) but ignores SIGTERM, in one shell session.
    script = nbd_serving_script(tmp_path / "stubborn-zerofs", before="trap '' TERM")
    backend = ProcessBackend(state_dir, command=[str(script)], stop_timeout=0.5)
    try:
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        pid = backend.pid(VOLUME)
        assert pid is not None
        members = session_members(pid)
        assert len(members) == 2  # the shell and nbdkit

        started = time.monotonic()
        backend.stop(VOLUME)

        assert time.monotonic() - started < 5
        assert not any(alive(member) for member in members)
    finally:
        backend.close()


def test_stop_kills_what_a_server_leaves_behind(state_dir: Path, tmp_path: Path) -> None:
    # A server that exits on SIGTERM and leaves a child of its own running.
    script = nbd_serving_script(
        tmp_path / "careless-zerofs", after="sleep 300 &\ntrap 'exit 0' TERM"
    )
    backend = ProcessBackend(state_dir, command=[str(script)])
    try:
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        pid = backend.pid(VOLUME)
        assert pid is not None
        members = session_members(pid)
        assert len(members) == 3  # the shell, nbdkit and sleep

        backend.stop(VOLUME)

        wait_until(lambda: not any(alive(m) for m in members), 10, "leftovers gone")
    finally:
        backend.close()
    assert processes_mentioning(str(script)) == []


def test_ready_timeout_names_the_socket_and_shows_the_log(state_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "silent-zerofs"
    script.write_text("#!/bin/sh\necho 'opening the object store' >&2\nexec sleep 60\n")
    script.chmod(0o755)
    backend = ProcessBackend(state_dir, command=[str(script)])
    try:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded) as caught:
            backend.ensure(VOLUME, settings_for(tmp_path, pod_ready_timeout_seconds=1), SECRETS)
        assert time.monotonic() - started < 5
    finally:
        backend.close()
    message = caught.value.message
    assert "did not answer" in message and str(backend.sockets(VOLUME).nbd) in message
    assert "within 1s" in message
    assert "opening the object store" in message
    assert str(state_dir / "servers" / VOLUME / "server.log") in message
    # Nothing half started is left behind.
    assert backend.running() == []
    assert processes_mentioning(str(script)) == []


def test_server_exiting_at_start_is_unavailable_with_its_last_words(
    backend: ProcessBackend, tmp_path: Path, command: list[str]
) -> None:
    if command != [str(STANDIN)]:
        pytest.skip("the refusal text is the stand-in's")
    # S3 storage and no credentials anywhere: the stand-in refuses to start.
    s3 = settings_for(tmp_path, storage_url=StorageUrl.parse("s3://bucket/volumes"))
    with pytest.raises(errors.Unavailable) as caught:
        backend.ensure(VOLUME, s3, SECRETS)
    assert "exited with status 1 while starting" in caught.value.message
    assert "no S3 credentials" in caught.value.message
    assert backend.running() == []


def test_secrets_stay_out_of_argv_config_and_errors(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path
) -> None:
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    pid = backend.pid(VOLUME)
    assert pid is not None

    for member in session_members(pid):
        assert PASSWORD not in "\0".join(cmdline(member))
    server_dir = state_dir / "servers" / VOLUME
    assert PASSWORD not in (server_dir / "config.toml").read_text()
    assert PASSWORD not in (server_dir / "server.json").read_text()
    assert PASSWORD not in (server_dir / "server.log").read_text()
    # The environment is where ZeroFS expands ${ZEROFS_CSI_ENCRYPTION_PASSWORD} from,
    # so the server (and only the server) has it there.
    assert environ(pid)[ENV_ENCRYPTION_PASSWORD] == PASSWORD
    for member in session_members(pid):
        if member != pid:
            assert PASSWORD not in "\0".join(environ(member).values())


def test_a_secret_printed_by_the_server_is_masked_in_the_error(
    state_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "leaky-zerofs"
    script.write_text(f'#!/bin/sh\necho "bad password: ${ENV_ENCRYPTION_PASSWORD}" >&2\nexit 3\n')
    script.chmod(0o755)
    backend = ProcessBackend(state_dir, command=[str(script)])
    try:
        with pytest.raises(errors.Unavailable) as caught:
            backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    finally:
        backend.close()
    assert "exited with status 3" in caught.value.message
    assert f"bad password: {MASK}" in caught.value.message
    assert PASSWORD not in caught.value.message


def test_log_file_records_each_start_and_rotates(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path, command: list[str]
) -> None:
    log_path = state_dir / "servers" / VOLUME / "server.log"
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"old line\n" * 200_000)  # 1.8 MB: over the rotation size

    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)

    rotated = log_path.with_name("server.log.1")
    assert rotated.read_bytes().startswith(b"old line\n")
    text = log_path.read_text()
    assert f"zerofs-csi: starting {command[0]} run -c {log_path.parent}/config.toml" in text
    if command == [str(STANDIN)]:
        wait_until(lambda: "zerofs-standin: serving" in log_path.read_text(), 15.0, "log line")


def test_missing_command_is_a_failed_precondition(state_dir: Path, tmp_path: Path) -> None:
    backend = ProcessBackend(state_dir, command=str(tmp_path / "no-such-zerofs"))
    try:
        with pytest.raises(errors.FailedPrecondition) as caught:
            backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    finally:
        backend.close()
    assert "no-such-zerofs" in caught.value.message
    assert backend.running() == []


@pytest.mark.parametrize("volume_id", ["../x", "a/b", "", "UPPER", "x" * 64])
def test_unsafe_volume_ids_are_refused_before_anything_runs(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path, volume_id: str
) -> None:
    with pytest.raises(errors.InvalidArgument):
        backend.ensure(volume_id, settings_for(tmp_path), SECRETS)
    with pytest.raises(errors.InvalidArgument):
        backend.stop(volume_id)
    assert list((state_dir / "servers").iterdir()) == []


def test_a_stopped_server_is_restarted_as_hung_and_a_slow_one_is_not(
    state_dir: Path, tmp_path: Path
) -> None:
    backend = ProcessBackend(
        state_dir, command=[str(STANDIN)], supervise_interval=0.05, hung_after=3.0
    )
    try:
        sockets = backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        pid = backend.pid(VOLUME)
        assert pid is not None
        # Stopped for less than the window: it answers again and stays.
        os.killpg(pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.killpg(pid, signal.SIGCONT)
        time.sleep(3.0)
        assert backend.pid(VOLUME) == pid and backend.restarts(VOLUME) == 0
        # Stopped for good: declared hung, killed (stopped as it is) and restarted.
        os.killpg(pid, signal.SIGSTOP)
        wait_until(lambda: backend.pid(VOLUME) not in (None, pid), 30, "restart")
        assert backend.restarts(VOLUME) == 1
        assert not alive(pid)
        wait_until(lambda: nbd_server_answers(sockets.nbd, 1.0), 15.0, "NBD answer")
    finally:
        backend.stop(VOLUME)
        backend.close()


@pytest.mark.parametrize("adopted", [False, True], ids=["own", "adopted-after-a-restart"])
def test_a_server_whose_socket_is_gone_is_restarted_at_once(
    state_dir: Path, tmp_path: Path, adopted: bool
) -> None:
    # Unreachable for good: restarted without waiting out the hung window (60 s here),
    # also by a plugin restarted since the server answered.
    def new_backend() -> ProcessBackend:
        return ProcessBackend(
            state_dir, command=[str(STANDIN)], supervise_interval=0.05, hung_after=60.0
        )

    backend = new_backend()
    try:
        sockets = backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        pid = backend.pid(VOLUME)
        if adopted:
            backend.close()
            backend = new_backend()
        sockets.nbd.unlink()
        wait_until(lambda: backend.pid(VOLUME) not in (None, pid), 15, "restart")
        assert not alive(pid)
        wait_until(lambda: nbd_server_answers(sockets.nbd, 1.0), 15.0, "NBD answer")
    finally:
        backend.stop(VOLUME)
        backend.close()


def backend_of_another_node(tmp_path: Path, command: list[str]) -> ProcessBackend:
    """A second plugin's backend (its own state directory and sockets), as on the node
    a volume moved to: its servers open the same storage."""
    return ProcessBackend(
        tmp_path / "other-node",
        command=command,
        stop_timeout=5,
        restart_backoff=(0.1, 1.0),
        supervise_interval=0.05,
    )


@pytest.mark.parametrize("adopted", [False, True], ids=["own", "adopted-after-a-restart"])
def test_a_server_fenced_by_a_newer_writer_is_not_restarted_until_staged_again(
    state_dir: Path,
    tmp_path: Path,
    command: list[str],
    caplog: pytest.LogCaptureFixture,
    adopted: bool,
) -> None:
    def here() -> ProcessBackend:
        return ProcessBackend(
            state_dir, command=command, restart_backoff=(0.1, 1.0), supervise_interval=0.05
        )

    backend = here()
    other = backend_of_another_node(tmp_path, command)
    try:
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        fenced_pid = backend.pid(VOLUME)
        assert fenced_pid is not None
        if adopted:
            backend.close()  # the plugin is down while its server is fenced
        other.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        wait_until(lambda: not alive(fenced_pid), 15.0, "the older server fenced")
        if adopted:
            backend = here()
        # Many times the restart delay: a supervisor that restarts has done so by now.
        time.sleep(3.0)
        assert backend.pid(VOLUME) is None
        assert backend.restarts(VOLUME) == 0
        state = json.loads((state_dir / "servers" / VOLUME / "server.json").read_text())
        assert state["fenced"] is True
        assert any("fenced" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        newer_pid = other.pid(VOLUME)
        assert newer_pid is not None and alive(newer_pid)

        # The volume given back to this node: its NodeStage starts a server, which
        # fences the other node's in turn.
        backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
        wait_until(lambda: not alive(newer_pid), 15.0, "the other node's server fenced")
        time.sleep(3.0)
        assert other.pid(VOLUME) is None and other.restarts(VOLUME) == 0
        assert backend.pid(VOLUME) is not None
    finally:
        for instance in (backend, other):
            stop_everything(instance)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_server_that_exits_for_another_reason_is_restarted(
    backend: ProcessBackend, tmp_path: Path, state_dir: Path
) -> None:
    """The fenced check reads only this process's output: a fenced line an earlier
    process logged does not stop the restart of a later one that was killed."""
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    log_path = state_dir / "servers" / VOLUME / "server.log"
    with open(log_path, "ab") as log:
        log.write(b"ERROR earlier life: Fatal write error, exiting: detected newer DB client\n")
    backend.stop(VOLUME)
    backend.ensure(VOLUME, settings_for(tmp_path), SECRETS)
    old_pid = backend.pid(VOLUME)
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: backend.pid(VOLUME) not in (None, old_pid), 15.0, "restart")
    assert backend.restarts(VOLUME) == 1
