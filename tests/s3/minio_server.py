"""One MinIO server on loopback with one drive: the object store of the tests, the demo
and the harnesses when they run a real ZeroFS, which refuses ``file://`` storage (no
conditional put) and needs a store with both put-if-not-exists and put-if-match. The
binary is the one ``make minio`` builds (``MINIO_BIN``); the root credentials are random
and reach the server through its environment only.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from s3store import client_of

from zerofs_csi.bench.plugin import S3Storage
from zerofs_csi.bench.zerofs_server import ZeroFSServer

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MinioServer:
    def __init__(self, workdir: Path, binary: Path) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.access_key = "zcsi" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.region = "us-east-1"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "minio.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        (self.workdir / "drive").mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_CI_CD": "on",
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(self.binary), "server", "--quiet", "--address",
                 f"127.0.0.1:{self.port}", str(self.workdir / "drive")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._live():
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"MinIO did not start:\n{tail}")
            time.sleep(0.5)

    def _live(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/live", timeout=5):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def client(self) -> object:
        return client_of(self)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        shutil.rmtree(self.workdir / "drive", ignore_errors=True)


@functools.cache
def volume_store(server: ZeroFSServer) -> S3Storage | None:
    """Where a run's volumes live: ``file://`` (None) for the stand-in; for ZeroFS a
    bucket on a MinIO server started once per process and stopped at its exit."""
    if not server.real:
        return None
    binary = os.environ.get("MINIO_BIN")
    if not binary:
        raise RuntimeError(
            "ZeroFS needs an S3 store with conditional put: set MINIO_BIN (make minio builds it)"
        )
    minio = MinioServer(Path(tempfile.mkdtemp(prefix="zerofs-csi-minio-")), Path(binary))
    minio.start()
    atexit.register(minio.stop)
    return S3Storage(
        minio.endpoint, minio.make_bucket("volumes"), minio.access_key, minio.secret_key
    )
