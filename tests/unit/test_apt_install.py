"""tools/apt-install: every apt-get of the project, one at a time (make test runs its
targets side by side, and apt-get fails at once on dpkg's lock held by another)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

APT_INSTALL = Path(__file__).resolve().parents[2] / "tools" / "apt-install"
LOCK = Path("/run/lock/zerofs-csi-apt.lock")
INSTALLED = "bash"  # Essential: installed everywhere this runs


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lock lives in /run/lock (root)")


def test_nothing_is_done_for_packages_already_installed() -> None:
    done = subprocess.run([str(APT_INSTALL), INSTALLED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # apt-get never ran


def test_an_installer_waits_for_the_one_holding_the_lock() -> None:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen([str(APT_INSTALL), INSTALLED])
        try:
            time.sleep(1.5)
            assert waiting.poll() is None, "apt-install ran while another installer held the lock"
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
        assert waiting.wait(timeout=60) == 0
