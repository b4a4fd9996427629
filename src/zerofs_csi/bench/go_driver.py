"""The baseline of the node benchmarks: what the Go driver's node does for a volume
(seed-driver.md, "Attach" and "Detach"), step by step with the tools it execs.

stage: start the volume's server and wait for its 9P socket, mount 9P in the kernel,
``truncate`` the export file ``.nbd/disk`` if it is missing, unmount 9P, reserve a free
device (an O_EXCL file), ``nbd-client -unix SOCK -N disk -persist -timeout 0
-connections 4 /dev/nbdX``, ``blkid`` the device, ``mkfs.<fs>`` with its defaults when
it holds no filesystem, ``mount``.
unstage: ``umount``, ``nbd-client -d``, stop the server, drop the reservation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from zerofs_csi.bench.plugin import SECRETS, S3Storage, accepts, wait_until
from zerofs_csi.host import mounts
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

START_TIMEOUT_S = 120.0
# The Go driver's export file and nbd-client flags (seed-driver.md, "Attach").
GO_EXPORT = "disk"
GO_NBD_CLIENT_FLAGS = ("-persist", "-timeout", "0", "-connections", "4")
# The kernel's 9P client over the server's unix socket. It attaches as "nobody" unless
# told otherwise, which the stand-in's diod cannot look up: attach as root.
GO_9P_OPTIONS = "trans=unix,version=9p2000.L,uname=root,access=any"


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (apt-get install them)")


def run_quiet(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; with ``check``, a failure raises RuntimeError with its stderr."""
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    if check and done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {stderr}")
    return done


# -- baseline: the Go driver's exec sequence ---------------------------------------------


class DeviceReservations:
    """The Go driver's reservations: a free /dev/nbdX claimed with an O_EXCL file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def reserve(self) -> int:
        for entry in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
            index = int(entry.name[3:])
            if (entry / "pid").exists():
                continue
            try:
                fd = os.open(self.directory / f"nbd{index}", os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            return index
        raise RuntimeError("no free NBD device")

    def release(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"nbd{index}").unlink()


@dataclass
class GoStyleVolume:
    """One volume staged the way the Go driver stages it."""

    workdir: Path
    volume_id: str
    size: int
    fs_type: str
    reservations: DeviceReservations
    zerofs_command: str
    s3: S3Storage | None = None  # None: file:// under ``workdir/store``
    server: subprocess.Popen[bytes] | None = None
    device_index: int | None = None
    ready_timeout_s: float = START_TIMEOUT_S
    # How long the last stage waited for the server, or the last unstage stopped it.
    server_seconds: float = 0.0
    sockets: ServerSockets = field(init=False)

    def __post_init__(self) -> None:
        self.sockets = ServerSockets.under(self.workdir / "sockets", self.volume_id)

    @property
    def staging(self) -> Path:
        return self.workdir / "staging" / self.volume_id

    def start_server(self) -> None:
        """The Go driver creates the volume's pod and waits for its 9P socket."""
        if self.s3 is None:
            settings = VolumeSettings(
                storage_url=StorageUrl.parse(f"file://{self.workdir / 'store'}"),
                filesystem=self.fs_type,
            )
            secrets = SECRETS
        else:
            settings = VolumeSettings(
                storage_url=StorageUrl.parse(f"s3://{self.s3.bucket}/go-driver"),
                filesystem=self.fs_type,
                s3_endpoint=self.s3.endpoint,
                s3_region=self.s3.region,
                s3_allow_http=self.s3.endpoint.startswith("http://"),
            )
            secrets = {**SECRETS, **self.s3.secrets()}
        directory = self.workdir / "servers" / self.volume_id
        directory.mkdir(parents=True, exist_ok=True)
        self.sockets.directory.mkdir(parents=True, exist_ok=True)
        rendered = render_zerofs_config(
            settings,
            self.volume_id,
            VolumeSecrets.from_csi_secrets(secrets),
            cache_dir=str(directory / "cache"),
            nbd_socket=str(self.sockets.nbd),
            ninep_socket=str(self.sockets.ninep),
        )
        config = directory / "config.toml"
        config.write_text(rendered.toml_text)
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
        with open(directory / "server.log", "ab") as log:
            self.server = subprocess.Popen(
                [self.zerofs_command, "run", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**environment, **dict(rendered.secret_env)},
                start_new_session=True,
            )
        wait_until(
            lambda: accepts(self.sockets.ninep) or self.server_exited(),
            self.ready_timeout_s,
            "the 9P socket",
        )
        if self.server_exited():
            raise RuntimeError(f"server exited; see {directory / 'server.log'}")

    def server_exited(self) -> bool:
        return self.server is None or self.server.poll() is not None

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(60)
        self.server = None

    def create_export(self) -> None:
        """Kernel 9P mount, ``truncate`` the export when missing, unmount."""
        mountpoint = self.workdir / "9p" / self.volume_id
        mountpoint.mkdir(parents=True, exist_ok=True)
        run_quiet(
            ["mount", "-t", "9p", "-o", GO_9P_OPTIONS, str(self.sockets.ninep), str(mountpoint)]
        )  # fmt: skip
        try:
            export = mountpoint / ".nbd" / GO_EXPORT
            if not export.exists():
                export.parent.mkdir(exist_ok=True)
                run_quiet(["truncate", "-s", str(self.size), str(export)])
        finally:
            run_quiet(["umount", str(mountpoint)])

    def stage(self) -> None:
        started = time.perf_counter()
        self.start_server()
        self.server_seconds = time.perf_counter() - started
        self.create_export()
        self.device_index = self.reservations.reserve()
        device = f"/dev/nbd{self.device_index}"
        run_quiet(
            ["nbd-client", "-unix", str(self.sockets.nbd), "-N", GO_EXPORT,
             *GO_NBD_CLIENT_FLAGS, device]
        )  # fmt: skip
        probe = run_quiet(["blkid", "-o", "value", "-s", "TYPE", device], check=False)
        if probe.returncode == 2:  # blkid: nothing found on the device
            run_quiet([f"mkfs.{self.fs_type}", device])
        elif probe.returncode != 0:
            raise RuntimeError(f"blkid {device}: {probe.stderr.decode(errors='replace')}")
        self.staging.mkdir(parents=True, exist_ok=True)
        run_quiet(["mount", "-t", self.fs_type, device, str(self.staging)])

    def unstage(self) -> None:
        entry = mounts.find_mount(str(self.staging))
        if entry is not None:
            run_quiet(["umount", str(self.staging)])
        if self.device_index is not None:
            run_quiet(["nbd-client", "-d", f"/dev/nbd{self.device_index}"])
            self.reservations.release(self.device_index)
            self.device_index = None
        started = time.perf_counter()
        self.stop_server()
        self.server_seconds = time.perf_counter() - started
