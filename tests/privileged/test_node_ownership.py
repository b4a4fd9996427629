"""Node calls touch only what the driver made, through the gRPC API against real mounts.

Foreign files, directories, mounts and other volumes' stages are left alone by unpublish
and unstage; symlinked target and staging paths are refused; a single-writer volume is
published at one target; a busy mount is refused with its holder named.

python3 tests/vm/runner.py --timeout 1800 -- .venv/bin/pytest -m privileged -q \
    -p no:cacheprovider tests/privileged/test_node_ownership.py
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from conftest import (
    MiB,
    Mode,
    PluginProcess,
    Volume,
    VolumeFactory,
    assert_code,
    assert_nbd_devices,
    assert_unstaged,
    create_volume,
    mount_capability,
    mounts_under,
    settled_nbd_devices,
)

from zerofs_csi.csi import csi_pb2
from zerofs_csi.host import mounts

pytestmark = pytest.mark.privileged

SIZE = 128 * MiB
OK = grpc.StatusCode.OK
UNKNOWN_VOLUME = "pvc-never-created"


def snapshot(path: Path) -> object:
    """What is at ``path`` without following symlinks: kind, contents, mounts on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        children = sorted((c.name, snapshot(c)) for c in path.iterdir())
        return ("directory", children, mounts_under(path))
    return ("file", path.read_bytes(), mounts_under(path))


@contextlib.contextmanager
def tmpfs_at(path: Path, content: bytes = b"foreign") -> Iterator[Path]:
    """A mount that is not the driver's, holding one file."""
    path.mkdir(parents=True, exist_ok=True)
    mounts.mount("tmpfs", path, "tmpfs", 0, "size=1m")
    try:
        (path / "file").write_bytes(content)
        yield path
    finally:
        mounts.unmount_all(path)


def write_through(target: Path, name: str) -> None:
    data = os.urandom(4096)
    with open(target / name, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert (target / name).read_bytes() == data


def stage_state(volume: Volume) -> tuple[object, ...]:
    """What must stay as it is while the volume is staged."""
    return (
        volume.record(),
        sorted(pid for pid, _ in volume.server_processes()),
        mounts_under(Path(volume.staging)),
    )


# -- one writer, one target ----------------------------------------------------------------

FP = grpc.StatusCode.FAILED_PRECONDITION
SSW, SMW = Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER
SNW, SRO = Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY
# A second NodePublishVolume at another target, by the access modes of the two calls
# (the CSI spec's table for plugins with SINGLE_NODE_MULTI_WRITER). SINGLE_NODE_WRITER is
# Kubernetes' ReadWriteOnce from before that capability: several pods of one node.
SECOND_TARGET = [
    (SSW, SSW, FP),
    (SMW, SSW, FP),
    (SSW, SMW, FP),
    (SSW, SRO, FP),
    (SMW, SMW, OK),
    (SNW, SNW, OK),
    (SRO, SRO, OK),
    (SMW, SRO, OK),
]


def test_a_single_writer_volume_is_published_at_one_target(volumes: VolumeFactory) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    pods = volume.plugin.workdir / "pods" / volume.volume_id
    first, second = pods / "first", pods / "second"
    for mode1, mode2, code in SECOND_TARGET:
        case = f"{Mode.Mode.Name(mode1)} then {Mode.Mode.Name(mode2)}"
        volume.publish(str(first), capability=mount_capability("ext4", mode=mode1))
        volume.publish(str(first), capability=mount_capability("ext4", mode=mode1))
        capability = mount_capability("ext4", mode=mode2)
        if code is OK:
            volume.publish(str(second), capability=capability)
            assert mounts_under(second) == [str(second)], case
        else:
            details = assert_code(partial(volume.publish, str(second), capability=capability), code)
            assert str(first) in details, case
            assert not second.exists(), case
        if mode1 != SRO:
            write_through(first, "data")
        if mode1 != mode2:  # the same target with other arguments: the spec's T1=T2, P1!=P2
            assert_code(
                partial(volume.publish, str(first), capability=capability),
                grpc.StatusCode.ALREADY_EXISTS,
            )
        for target in (first, second):
            volume.unpublish(str(target))
            assert not target.exists(), case
    # What csi-sanity's clean-up does after a refused second publish: both succeed.
    volume.unstage()
    assert_unstaged(volume)


# -- unstage undoes the stage at its own path only ------------------------------------------


def test_unstage_undoes_only_the_stage_at_its_path(
    plugin: PluginProcess, volumes: VolumeFactory
) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    target = plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    write_through(target, "before")
    other = volumes(fs_type="ext4", size=SIZE)
    other.stage()
    kept = {v.volume_id: stage_state(v) for v in (volume, other)}
    assert all(state[1] for state in kept.values()), "each volume has a running server"

    kubelet = plugin.workdir / "kubelet" / f"foreign-{volume.volume_id}"
    empty = kubelet / "empty"
    empty.mkdir(parents=True)
    with tmpfs_at(kubelet / "foreign-mount" / "mount") as foreign:
        paths = {
            "a path never staged": kubelet / "never",
            "an empty directory": empty,
            "a foreign mount at <path>/mount": foreign.parent,
            "another volume's staging path": Path(other.staging),
        }
        before = {name: snapshot(path) for name, path in paths.items()}
        for name, path in paths.items():
            for vid in (volume.volume_id, UNKNOWN_VOLUME):
                plugin.node.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(path)),
                    timeout=120,
                )
                for v in (volume, other):
                    assert stage_state(v) == kept[v.volume_id], (name, vid, v.volume_id)
            assert snapshot(path) == before[name], name
        assert (foreign / "file").read_bytes() == b"foreign"
    write_through(target, "after")


# -- unpublish removes only its own publication ---------------------------------------------


def test_unpublish_leaves_what_is_not_a_publication_of_the_volume(
    plugin: PluginProcess, volumes: VolumeFactory
) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    other = volumes(fs_type="ext4", size=SIZE)
    other.stage()
    base = plugin.workdir / "pods" / f"foreign-{volume.volume_id}"
    base.mkdir(parents=True)
    (base / "regular file").write_bytes(b"keep me")
    (base / "empty file").touch()
    (base / "empty directory").mkdir()
    (base / "directory").mkdir()
    (base / "directory" / "file").write_bytes(b"keep me too")
    (base / "symlink to a directory").symlink_to(base / "directory")
    (base / "symlink to a file").symlink_to(base / "regular file")
    with contextlib.ExitStack() as stack:
        stack.enter_context(tmpfs_at(base / "foreign mount"))
        # Another volume's filesystem bound by someone else: a mount of the driver's, but
        # no publication of this volume.
        (base / "bind of another volume").mkdir()
        mounts.bind_mount(Path(other.staging) / "mount", base / "bind of another volume", False)
        stack.callback(mounts.unmount_all, base / "bind of another volume")
        targets = sorted(base.iterdir())
        before = {t.name: snapshot(t) for t in targets}
        for target in targets:
            for vid in (volume.volume_id, UNKNOWN_VOLUME):
                volume.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
                    timeout=120,
                )
                assert snapshot(target) == before[target.name], (target.name, vid)
        assert {t.name: snapshot(t) for t in sorted(base.iterdir())} == before


def test_unstage_without_a_record_leaves_a_foreign_mount(plugin: PluginProcess) -> None:
    staging = plugin.workdir / "kubelet" / "no-record"
    with tmpfs_at(staging / "mount") as foreign:
        plugin.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=UNKNOWN_VOLUME, staging_target_path=str(staging)
            ),
            timeout=120,
        )
        assert mounts_under(staging) == [str(foreign)]
        assert (foreign / "file").read_bytes() == b"foreign"


def test_a_publication_that_lost_its_mount_is_cleaned_after_a_restart(
    own_plugin: PluginProcess,
) -> None:
    """What a publish that died half way leaves (the target made, nothing mounted) is
    still the driver's after a plugin restart; an unrelated empty directory is not."""
    plugin = own_plugin
    volume = create_volume(plugin, plugin.workdir, fs_type="ext4", size=SIZE)
    volume.stage()
    pods = plugin.workdir / "pods" / volume.volume_id
    mounted, lost, unrelated = pods / "mounted", pods / "lost-its-mount", pods / "unrelated"
    volume.publish(str(mounted))
    volume.publish(str(lost))
    mounts.unmount_all(lost)
    unrelated.mkdir()
    plugin.kill9()
    plugin.start()
    for target in (mounted, lost, unrelated):
        volume.unpublish(str(target))
    assert not mounted.exists() and not lost.exists()
    assert unrelated.is_dir()
    volume.unstage()
    assert_unstaged(volume)


# -- symlinks -------------------------------------------------------------------------------


def test_symlinked_staging_paths_are_refused(plugin: PluginProcess, volumes: VolumeFactory) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    base = plugin.workdir / "kubelet" / f"symlinks-{volume.volume_id}"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(parents=True)
    (elsewhere / "file").write_bytes(b"not the volume's")
    (base / "staging-link").symlink_to(elsewhere)
    (base / "parent-link").symlink_to(elsewhere)
    (base / "mount-link" / "staging").mkdir(parents=True)
    (base / "mount-link" / "staging" / "mount").symlink_to(elsewhere)
    cases = {
        "the staging path is a symlink": base / "staging-link",
        "a parent of the staging path is a symlink": base / "parent-link" / "staging",
        "<staging path>/mount is a symlink": base / "mount-link" / "staging",
    }
    devices = settled_nbd_devices()
    before = snapshot(elsewhere)
    for name, staging in cases.items():
        attempt = Volume(
            plugin=plugin,
            volume_id=volume.volume_id,
            context=volume.context,
            fs_type=volume.fs_type,
            staging=str(staging),
            capability=volume.capability,
        )
        details = assert_code(attempt.stage, grpc.StatusCode.FAILED_PRECONDITION)
        assert "symlink" in details, (name, details)
        assert snapshot(elsewhere) == before, name
        assert not mounts_under(base), name
        assert not volume.server_processes(), name
        assert_nbd_devices(devices, name)
    assert not (plugin.state_dir / "staged" / f"{volume.volume_id}.json").exists()
    volume.stage()  # the real staging path still works
    volume.unstage()
    assert_unstaged(volume)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_symlinked_targets_are_refused(
    plugin: PluginProcess, volumes: VolumeFactory, block: bool
) -> None:
    volume = volumes(fs_type="ext4", size=SIZE, block=block)
    volume.stage()
    base = plugin.workdir / "pods" / f"symlinks-{volume.volume_id}"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(parents=True)
    (elsewhere / "file").write_bytes(b"not the volume's")
    (base / "to-directory").symlink_to(elsewhere)
    (base / "to-file").symlink_to(elsewhere / "file")
    (base / "dangling").symlink_to(elsewhere / "missing")
    (base / "parent").symlink_to(elsewhere)
    cases = {
        "a symlink to a directory": base / "to-directory",
        "a symlink to a file": base / "to-file",
        "a dangling symlink": base / "dangling",
        "a target under a symlinked parent": base / "parent" / "target",
    }
    before = snapshot(base)
    for name, target in cases.items():
        details = assert_code(partial(volume.publish, str(target)), FP)
        assert "symlink" in details, (name, details)
        assert snapshot(base) == before, name
    assert not mounts_under(base)
    volume.targets.clear()


# -- busy mounts ----------------------------------------------------------------------------


@contextlib.contextmanager
def holder(cwd: Path | None = None, open_file: Path | None = None) -> Iterator[int]:
    """A process keeping a mount busy, by its working directory or an open file."""
    script = "import sys, time\nf = open(sys.argv[1], 'w') if sys.argv[1] else None\n"
    script += "print('ready', flush=True)\ntime.sleep(600)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(open_file or "")],
        cwd=cwd or "/",
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_busy_mounts_are_refused_with_their_holder(
    plugin: PluginProcess, volumes: VolumeFactory
) -> None:
    volume = volumes(fs_type="ext4", size=SIZE)
    volume.stage()
    target = plugin.workdir / "pods" / volume.volume_id / "volume"
    volume.publish(str(target))
    with holder(cwd=target) as pid:
        details = assert_code(lambda: volume.unpublish(str(target)), FP)
        assert f"pid {pid}" in details and "python" in details, details
        assert mounts_under(target) == [str(target)]
    volume.unpublish(str(target))
    assert not target.exists()

    staged = Path(volume.staging) / "mount"
    with holder(open_file=staged / "held") as pid:
        details = assert_code(volume.unstage, FP)
        assert f"pid {pid}" in details, details
        assert volume.record()["phase"] == "staged"
        assert mounts_under(Path(volume.staging)) == [str(staged)]
    volume.unstage()
    assert_unstaged(volume)


# -- a publish that fails undoes itself -----------------------------------------------------


@contextlib.contextmanager
def no_more_mounts() -> Iterator[None]:
    """fs.mount-max at the number of mounts there are: the next mount fails ENOSPC."""
    limit = Path("/proc/sys/fs/mount-max")
    saved = limit.read_text()
    limit.write_text(f"{len(mounts.mountinfo())}\n")
    try:
        yield
    finally:
        limit.write_text(saved)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_a_failed_publish_leaves_no_target(volumes: VolumeFactory, block: bool) -> None:
    volume = volumes(fs_type="ext4", size=SIZE, block=block)
    volume.stage()
    target = volume.plugin.workdir / "pods" / volume.volume_id / "volume"
    with no_more_mounts():
        assert_code(partial(volume.publish, str(target)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert not target.exists()
    volume.publish(str(target))
    assert mounts_under(target) == [str(target)]
    volume.unpublish(str(target))
    assert not target.exists()
