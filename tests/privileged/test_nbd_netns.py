"""The attach path in a network namespace of its own, as a node plugin pod without
hostNetwork runs it (in the VM).

The kernel registers the ``nbd`` generic netlink family in the initial network namespace
only, so there the module is loaded and the family still cannot be found: the error must
name that cause, not an unloaded module.

python3 tests/vm/runner.py --timeout 900 -- .venv/bin/pytest -q tests/privileged/test_nbd_netns.py
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from zerofs_csi.nbd import attach as nbd

pytestmark = pytest.mark.privileged

# Attaches an export through the node's attach path and prints the outcome as JSON.
ATTACH = """
import json, sys
from zerofs_csi.nbd import attach as nbd
from zerofs_csi.errors import CsiError
from zerofs_csi.node.attach import NodeAttacher

attacher = NodeAttacher(nbd.NbdAttacher(), connections=1)
try:
    device = attacher.attach(sys.argv[1], sys.argv[2], sys.argv[3])
except CsiError as exc:
    print(json.dumps({"code": exc.code.name, "reason": exc.reason, "message": exc.message}))
else:
    attacher.detach(device.index, sys.argv[3])
    print(json.dumps({"attached": device.index}))
"""


@contextmanager
def nbdkit_memory(directory: Path) -> Iterator[Path]:
    """nbdkit's memory plugin on a unix socket: any export name, 16 MiB."""
    sock = directory / "nbd.sock"
    server = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "memory", "16M"], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(sock))
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, "no nbdkit"
                    time.sleep(0.05)
        yield sock
    finally:
        server.kill()
        server.wait()


def attach_in(prefix: list[str], sock: Path, backend_id: str) -> dict[str, object]:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", ATTACH, str(sock), "disk", backend_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_attach_outside_the_host_network_namespace_names_the_cause(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed"
    assert Path("/sys/module/nbd").is_dir(), "the VM loads nbd"
    backend_id = f"netns-{uuid.uuid4().hex[:8]}"
    with nbdkit_memory(tmp_path) as sock:
        # The unix socket is reachable from any network namespace; only the netlink
        # family is not.
        isolated = attach_in([unshare, "--net", "--"], sock, backend_id)
        assert isolated["code"] == "FAILED_PRECONDITION", isolated
        assert isolated["reason"] == "ENOENT"
        message = str(isolated["message"])
        assert "outside the host network namespace" in message
        assert "hostNetwork" in message
        assert "module is not loaded" not in message
        assert nbd.NbdAttacher().find_device(backend_id) is None

        # The same attach in the host's network namespace works (and detaches).
        host = attach_in([], sock, backend_id)
        assert isinstance(host.get("attached"), int), host
