"""CO-given paths walked without following symlinks, mount errors with CSI codes, and
the processes holding a busy mount, on a real filesystem (no mounting: no root needed)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from zerofs_csi.errors import CsiError
from zerofs_csi.host import mounts
from zerofs_csi.node import mounts as node_mounts


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory, a file, and symlinks to each and to nothing, beside them."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"content")
    (tmp_path / "empty-file").touch()
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "link-dir").symlink_to(tmp_path / "dir")
    (tmp_path / "link-file").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    return tmp_path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("dir", "directory"),
        ("file", "file"),
        ("absent", None),
        ("absent/below", None),
        ("file/below", None),  # a parent that is not a directory: nothing there
        ("link-dir", "symlink"),
        ("link-file", "symlink"),
        ("dangling", "symlink"),
        ("link-dir/inside", "symlink"),
        ("dangling/below", "symlink"),
    ],
)
def test_lookup(tree: Path, path: str, kind: str | None) -> None:
    full = str(tree / path)
    if kind == "symlink":
        with pytest.raises(node_mounts.SymlinkInPath) as refused:
            node_mounts.lookup(full)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "symlink" in refused.value.message and full in refused.value.message
        return
    found = node_mounts.lookup(full)
    if kind is None:
        assert found is None
    else:
        assert found is not None and found.st_ino == os.lstat(full).st_ino


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_make_makes_missing_parents_once(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "a" / "b" / "target"
    assert node_mounts.make(str(path), kind) is True
    assert path.is_dir() if kind == "directory" else path.is_file()
    assert node_mounts.make(str(path), kind) is False
    assert (tmp_path / "a").stat().st_mode & 0o777 == node_mounts.DIRECTORY_MODE & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("path", "kind", "code"),
    [
        ("link-dir", "directory", grpc.StatusCode.FAILED_PRECONDITION),
        ("dangling", "directory", grpc.StatusCode.FAILED_PRECONDITION),
        ("dangling", "file", grpc.StatusCode.FAILED_PRECONDITION),
        ("link-dir/target", "directory", grpc.StatusCode.FAILED_PRECONDITION),
        ("dangling/target", "file", grpc.StatusCode.FAILED_PRECONDITION),
        ("file", "directory", grpc.StatusCode.FAILED_PRECONDITION),
        ("dir", "file", grpc.StatusCode.FAILED_PRECONDITION),
        ("file/target", "directory", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_make_refuses_and_leaves_everything_as_it_was(
    tree: Path, path: str, kind: str, code: grpc.StatusCode
) -> None:
    before = listing(tree)
    with pytest.raises(CsiError) as refused:
        node_mounts.make(str(tree / path), kind)
    assert refused.value.code == code, refused.value.message
    assert listing(tree) == before


def test_opened_reaches_the_path_itself(tree: Path) -> None:
    with node_mounts.opened(str(tree / "dir")) as fd:
        assert os.path.realpath(node_mounts.fd_path(fd)) == str(tree / "dir")
    with pytest.raises(node_mounts.SymlinkInPath), node_mounts.opened(str(tree / "link-dir")):
        pass


@pytest.mark.parametrize(
    ("path", "removed"),
    [
        ("empty-dir", True),
        ("empty-file", True),
        ("absent", True),
        ("dir", False),
        ("file", False),
        ("link-dir", False),
        ("dangling", False),
        ("link-dir/inside", False),
    ],
)
def test_remove_if_empty(tree: Path, path: str, removed: bool) -> None:
    before = listing(tree)
    if removed:
        assert node_mounts.remove_if_empty(str(tree / path)) is True
        assert listing(tree) == [p for p in before if p != path]
    else:
        refused = pytest.raises(node_mounts.SymlinkInPath)
        with refused if "link-dir/" in path else contextlib.nullcontext():
            assert node_mounts.remove_if_empty(str(tree / path)) is False
        assert listing(tree) == before


# -- holders ------------------------------------------------------------------------------


def _holding(cwd: Path, open_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    script = "import sys, time\nf = open(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(open_file)], cwd=cwd, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def held(tree: Path) -> Iterator[subprocess.Popen[bytes]]:
    yield from _holding(tree / "dir", tree / "file")


def test_holders_name_the_process_and_how_it_holds(
    tree: Path, held: subprocess.Popen[bytes]
) -> None:
    def inode(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    for path, how in ((tree / "dir", "working directory"), (tree / "file", "open file")):
        wanted = inode(path)
        found = mounts.holders(lambda st, w=wanted: (st.st_dev, st.st_ino) == w)
        mine = [h for h in found if h.pid == held.pid]
        assert mine, (path, found)
        assert mine[0].how == how and mine[0].path == str(path)
        assert f"pid {held.pid} (python" in str(mine[0])


def test_holders_are_bounded(tree: Path) -> None:
    assert len(mounts.holders(lambda st: True, limit=2)) == 2


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EBUSY, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errno.ENOMEM, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errno.EPERM, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.ENOTDIR, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.EIO, grpc.StatusCode.INTERNAL),
    ],
)
def test_mount_errors_carry_codes_the_co_can_act_on(
    tree: Path, err: int, code: grpc.StatusCode
) -> None:
    with pytest.raises(CsiError) as mapped, node_mounts.mount_errors("unmounting x", str(tree)):
        raise OSError(err, f"umount failed: {os.strerror(err)}", str(tree))
    assert mapped.value.code == code
    assert mapped.value.reason == errno.errorcode[err]
    assert mapped.value.message.startswith(f"unmounting x: umount failed: {os.strerror(err)}")


def test_a_busy_error_names_the_holder(tree: Path, held: subprocess.Popen[bytes]) -> None:
    # _holders_of matches by filesystem: any process on tmp_path's filesystem counts.
    with pytest.raises(CsiError) as mapped, node_mounts.mount_errors("x", str(tree / "dir")):
        raise OSError(errno.EBUSY, "umount failed: Device or resource busy")
    assert "in use by pid " in mapped.value.message
