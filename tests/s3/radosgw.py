"""A throwaway single-node Ceph cluster serving S3 through radosgw on 127.0.0.1.

One monitor with authentication off, one memstore OSD (data in RAM), pools of size 1,
and radosgw with the beast frontend; everything lives in one temporary directory and
every daemon runs in the foreground as our child, so stopping is terminate-and-wait.
No manager daemon is started: placement and I/O work without one.

Usage::

    gateway = RadosGateway(Path(tempfile.mkdtemp()))
    gateway.start()          # about 10-15 s
    ... boto3 against gateway.endpoint with gateway.access_key / gateway.secret_key ...
    gateway.stop()           # stops the daemons, removes the directory
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from zerofs_csi.bench.plugin import free_tcp_port

# Every apt-get of the project, one at a time (make test runs targets side by side).
APT_INSTALL = Path(__file__).resolve().parents[2] / "tools" / "apt-install"
DEBIAN_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
BINARIES = ("ceph", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool")


class RadosGatewayUnavailable(RuntimeError):
    """radosgw cannot be provided here (not installed and no way to install it)."""


def ensure_installed() -> None:
    """Install the Ceph packages from Debian if any binary is missing (idempotent)."""
    if all(shutil.which(binary) for binary in BINARIES):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RadosGatewayUnavailable(
            "Ceph radosgw is not installed and cannot be installed here (needs root and "
            f"apt-get): apt-get install {' '.join(DEBIAN_PACKAGES)}"
        )
    subprocess.run([str(APT_INSTALL), *DEBIAN_PACKAGES], check=True, capture_output=True)
    missing = [binary for binary in BINARIES if shutil.which(binary) is None]
    if missing:
        raise RadosGatewayUnavailable(f"installed {DEBIAN_PACKAGES} but {missing} still missing")


class RadosGateway:
    """The cluster's lifecycle and the S3 endpoint and credentials it serves."""

    region = "us-east-1"

    def __init__(self, workdir: Path, *, start_timeout: float = 90.0) -> None:
        self.workdir = workdir
        self.start_timeout = start_timeout
        self.mon_port = free_tcp_port()
        self.rgw_port = free_tcp_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.access_key = "ZEROFSCSI" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_seconds: float | None = None
        self.ceph_version = ""
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._conf = workdir / "ceph.conf"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        began = time.monotonic()
        deadline = began + self.start_timeout
        for sub in ("mon", "osd", "rgw", "run", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self._conf.write_text(self._config(fsid))

        monmap = self.workdir / "monmap"
        self._run(
            "monmaptool",
            "--create",
            "--add",
            "a",
            f"v2:127.0.0.1:{self.mon_port}",
            "--fsid",
            fsid,
            str(monmap),
        )
        self._run("ceph-mon", "-c", str(self._conf), "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._spawn("ceph-mon", "ceph-mon", "-c", str(self._conf), "-i", "a", "-f")
        self._wait(lambda: self._ceph_ok("mon", "stat"), deadline, "the monitor to answer")

        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        self._run("ceph-osd", "-c", str(self._conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn("ceph-osd", "ceph-osd", "-c", str(self._conf), "-i", osd_id, "-f")
        self._wait(self._osd_up, deadline, "the OSD to come up")

        self._spawn("radosgw", "radosgw", "-c", str(self._conf), "-n", "client.rgw", "-f")
        self._wait(self._rgw_answers, deadline, "radosgw to answer HTTP")
        self._run(
            "radosgw-admin",
            "-c",
            str(self._conf),
            "user",
            "create",
            "--uid=zerofs-csi-test",
            "--display-name=zerofs-csi tests",
            f"--access-key={self.access_key}",
            f"--secret-key={self.secret_key}",
        )
        self.startup_seconds = time.monotonic() - began
        self.ceph_version = self._run("radosgw", "--version").split("(")[0].split()[-1]

    def stop(self) -> None:
        """Stop every daemon (newest first) and remove the working directory."""
        while self._processes:
            _, process = self._processes.pop()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RadosGateway:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers

    def _config(self, fsid: str) -> str:
        w = self.workdir
        return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
# With auth off there is no session key, so "secure" connection mode cannot work.
ms mon client mode = crc
ms client mode = crc
ms mon service mode = crc
ms service mode = crc
ms mon cluster mode = crc
ms cluster mode = crc
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
memstore device bytes = 1073741824
run dir = {w}/run
admin socket = {w}/run/$name.asok
pid file = {w}/run/$name.pid
log file = {w}/log/$name.log

[mon.a]
mon data = {w}/mon

[osd.0]
osd data = {w}/osd

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw data = {w}/rgw
"""

    def _run(self, *argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
            )
        return result.stdout

    def _ceph(self, *argv: str) -> str:
        return self._run("ceph", "-c", str(self._conf), "--connect-timeout", "5", *argv)

    def _ceph_ok(self, *argv: str) -> bool:
        try:
            self._ceph(*argv)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _osd_up(self) -> bool:
        try:
            status = json.loads(self._ceph("osd", "stat", "-f", "json"))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return False
        return bool(status.get("num_up_osds", 0) >= 1)

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _spawn(self, name: str, *argv: str) -> None:
        with open(self.workdir / "log" / f"{name}.out", "wb") as output:
            process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._processes.append((name, process))

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            for name, process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode} while waiting for {what}: "
                        + self._log_tail(name)
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                names = ", ".join(name for name, _ in self._processes)
                raise TimeoutError(
                    f"timed out after {self.start_timeout:.0f} s waiting for {what} "
                    f"(running: {names})"
                )
            time.sleep(0.2)

    def _log_tail(self, name: str) -> str:
        path = self.workdir / "log" / f"{name}.out"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no output)"
