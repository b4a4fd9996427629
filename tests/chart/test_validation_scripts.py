"""The validation chart's write and verify scripts, run as the test pods run them.

Each run gets a busybox root (the pods' image is busybox too) in a private mount
namespace, with the chart's rendered scripts at /scripts and a tmpfs at /data whose
mount source names an NBD device, as a staged volume's bind mount shows it in
/proc/mounts. The driver is not involved: these tests check that the scripts pass on
good data and fail, saying why, on missing, corrupted or wrongly mounted data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chart.conftest import VALIDATION_CHART, Helm, find

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
FILES, FILE_MIB = 3, 2


def _static_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.exists():
            ldd = subprocess.run(["ldd", str(candidate)], capture_output=True, text=True)
            if "not a dynamic executable" in ldd.stdout + ldd.stderr:
                return candidate
    pytest.skip("no static busybox (Debian package busybox-static) to build the pod's root from")


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace and chroot"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"unshare --mount is not allowed here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def pod_root(helm: Helm, tmp_path: Path) -> Path:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "root"
    for directory in ("bin", "dev", "proc", "data", "scripts", "tmp"):
        (root / directory).mkdir(parents=True)
    shutil.copy2(_static_busybox(), root / "bin" / "busybox")
    scripts = find(helm.render(VALIDATION_CHART), "ConfigMap", "-scripts")["data"]
    for name, text in scripts.items():
        (root / "scripts" / name).write_text(text)
    return root


def _run_pods(root: Path, steps: list[str], *, source: str = "/dev/nbd3") -> list[str]:
    """Run the steps one after the other on one volume; each step's output and status."""
    between = {
        # Byte 1000 of file-1 replaced by the next value: a fixed byte would leave random
        # data unchanged once in 256 runs.
        "corrupt": "chroot {root} /bin/busybox sh -c '"
        "f=/data/validation/file-1; "
        'old=$(dd if=$f bs=1 skip=1000 count=1 2>/dev/null | od -An -tu1 | tr -d " "); '
        'printf "\\\\$(printf %o $(((old + 1) % 256)))" '
        "| dd of=$f bs=1 seek=1000 conv=notrunc 2>/dev/null'",
        "empty": "rm -rf {root}/data/validation {root}/data/validation.sha256",
    }
    commands = [
        f"mount -t proc proc {root}/proc",
        # The pod's /dev (urandom, null), as the container runtime gives it.
        f"mount --rbind /dev {root}/dev",
        f"mount -t tmpfs {source} {root}/data",
        f"chroot {root} /bin/busybox --install -s /bin",
    ]
    for step in steps:
        if step in between:
            commands.append(between[step].format(root=root))
        else:
            commands.append(f'chroot {root} /bin/sh /scripts/{step}.sh; echo "== {step} exit $?"')
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(commands)],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/bin:/usr/bin:/sbin:/usr/sbin",
            "FILES": str(FILES),
            "FILE_MIB": str(FILE_MIB),
        },
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines() + done.stderr.splitlines()


def test_written_data_verifies(pod_root: Path) -> None:
    output = _run_pods(pod_root, ["write", "verify"])
    assert "== write exit 0" in output
    assert "== verify exit 0" in output
    assert f"wrote {FILES} files of {FILE_MIB} MiB and their checksums" in output
    assert f"verified {FILES} files after detach and re-attach" in output
    assert "/data is mounted from /dev/nbd3" in output


def test_a_changed_byte_fails_verification(pod_root: Path) -> None:
    output = _run_pods(pod_root, ["write", "corrupt", "verify"])
    assert "== write exit 0" in output
    assert "file-1: FAILED" in output
    assert "== verify exit 1" in output


def test_data_that_did_not_survive_fails_verification(pod_root: Path) -> None:
    output = _run_pods(pod_root, ["write", "empty", "verify"])
    assert "FAIL: /data/validation.sha256 is missing: the written data did not survive" in output
    assert "== verify exit 1" in output


def test_a_volume_not_on_nbd_is_refused(pod_root: Path) -> None:
    output = _run_pods(pod_root, ["write"], source="tmpfs")
    assert "FAIL: /data is mounted from 'tmpfs', not an NBD device" in output
    assert "== write exit 1" in output
