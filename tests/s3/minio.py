"""A distributed MinIO set for the S3 tests: two servers with two drives each, each
server a host of its own in a network namespace made here, so that one can be killed
and restarted, or cut off the network and restored, while the other keeps serving.

Topology (all of it made by ``start`` and removed by ``stop``)::

    host (this process)        hub namespace           server namespaces
    198.18.N.254 --veth-- [ bridge ] --veth-- a: 198.18.N.1:9000, drives a1 a2
                                     --veth-- b: 198.18.N.2:9000, drives b1 b2

198.18.0.0/15 is RFC 2544's range for testing network devices: never routed, and none
of the private ranges a machine may use already; N is a /24 no address of the host is
in. The bridge lives in its own namespace so that the host's firewall never sees the
servers' traffic. The four drives make one erasure set of parity 2 (MinIO's default for
four drives), so reads need two drives and writes three: with one server down or cut
off the set still lists and reads, and refuses every write and delete until the server
is back. ``servers`` and ``drives_per_server`` choose another shape: four servers of
one drive each (the HA soak's, ``tools/harness/soak.py --minio-set``) keep write quorum
with any one server down and lose it with two.

The root credentials are random per set and given to the servers in their environment
only; the servers run with ``--quiet`` (no banner), and the log tails this module puts
into errors have the secret masked.

Usage::

    minio = MinioSet(Path(tempfile.mkdtemp()), binary)
    minio.start()            # a few seconds
    ... boto3 against minio.endpoint (server a) with minio.access_key / minio.secret_key
    minio.kill("b"); minio.restart("b"); minio.cut_off("b"); minio.restore("b")
    minio.stop()             # stops the servers, removes the namespaces and the directory
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVERS = ("a", "b")
DRIVES_PER_SERVER = 2
PORT = 9000
TEST_RANGE = ipaddress.ip_network("198.18.0.0/15")
# Namespaces of this module are named after the process that made them, so that a run
# can remove what a killed run left behind.
NAMESPACE_PREFIX = "zcsi-minio-"


class MinioUnavailable(RuntimeError):
    """The MinIO set cannot run here (no binary, or no network namespaces)."""


def check_runnable(binary: Path) -> None:
    if not os.access(binary, os.X_OK):
        raise MinioUnavailable(f"MinIO binary {binary} is missing: make minio builds it")
    if os.geteuid() != 0:
        raise MinioUnavailable("the MinIO set needs root for its network namespaces")
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            raise MinioUnavailable(f"the MinIO set needs {tool} (iproute2)")


def _ip(*argv: str) -> str:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def remove_abandoned_namespaces() -> None:
    """Stop the servers of, and delete, this module's namespaces whose making process is
    gone (a run killed before its clean-up)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NAMESPACE_PREFIX):
            continue
        pid = name[len(NAMESPACE_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for server_pid in _ip("netns", "pids", name).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(server_pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    used = []
    for entry in json.loads(_ip("-j", "-4", "addr", "show")):
        for addr in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    candidates = [
        net
        for net in TEST_RANGE.subnets(new_prefix=24)
        if not any(net.overlaps(other) for other in used)
    ]
    return random.choice(candidates)


class MinioSet:
    """The set's lifecycle, its S3 endpoint and credentials, and its faults."""

    region = "us-east-1"

    def __init__(
        self,
        workdir: Path,
        binary: Path,
        *,
        start_timeout: float = 120.0,
        servers: tuple[str, ...] = SERVERS,
        drives_per_server: int = DRIVES_PER_SERVER,
    ) -> None:
        if len(servers) * drives_per_server < 4 or len(servers) < 2:
            raise ValueError("a distributed MinIO set needs 2 or more servers and 4 or more drives")
        self.workdir = workdir
        self.binary = binary
        self.start_timeout = start_timeout
        self.servers = servers
        self.drives_per_server = drives_per_server
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.host_address = str(hosts[-1])
        self.addresses = {server: str(hosts[n]) for n, server in enumerate(servers)}
        self.endpoints = {
            server: f"http://{address}:{PORT}" for server, address in self.addresses.items()
        }
        self.endpoint = self.endpoints[servers[0]]
        self.access_key = "ZEROFSCSI" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_seconds: float | None = None
        self.version = ""
        tag = f"{NAMESPACE_PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self._hub = f"{tag}-hub"
        self._namespaces = {server: f"{tag}-{server}" for server in servers}
        # The host's end of its link, named in the host's namespace: at most 15 characters.
        self._host_link = f"zminio{secrets.token_hex(3)}"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        began = time.monotonic()
        remove_abandoned_namespaces()
        self._make_network()
        for server in self.servers:
            for drive in self._drives(server):
                drive.mkdir(parents=True)
            self._spawn(server)
        self.wait_healthy(began + self.start_timeout)
        self.startup_seconds = time.monotonic() - began
        self.version = self._version()

    def stop(self) -> None:
        """Stop the servers, remove the namespaces and links, and the working directory."""
        for server in list(self._processes):
            self._terminate(server)
        for namespace in [*self._namespaces.values(), self._hub]:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "delete", self._host_link], capture_output=True, timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MinioSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def kill(self, server: str) -> None:
        """SIGKILL one server: its connections close at once."""
        process = self._processes.pop(server)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def restart(self, server: str) -> None:
        """Start a killed server again on the same drives (``wait_healthy`` waits for it)."""
        if server in self._processes:
            raise RuntimeError(f"MinIO server {server} is still running")
        self._spawn(server)

    def cut_off(self, server: str) -> None:
        """The hub's bridge drops every frame to and from the server; its links stay up,
        so connections to it hang rather than fail, as behind a dead switch."""
        self._bridge_port_state(server, "disabled")

    def restore(self, server: str) -> None:
        self._bridge_port_state(server, "forwarding")

    def running(self, server: str) -> bool:
        process = self._processes.get(server)
        return process is not None and process.poll() is None

    def healthy(self, server: str) -> bool:
        """The server answers that the set has write quorum (MinIO's cluster check)."""
        url = self.endpoints[server] + "/minio/health/cluster"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, deadline: float | None = None) -> float:
        """Wait until every server is running and answers with write quorum; returns the
        seconds waited."""
        began = time.monotonic()
        deadline = deadline or began + self.start_timeout
        while True:
            for server, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"MinIO server {server} exited with {process.returncode}: "
                        + self.log_tail(server)
                    )
            if len(self._processes) == len(self.servers) and all(map(self.healthy, self.servers)):
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the MinIO set did not report write quorum on every server within "
                    f"{deadline - began:.0f} s; server {self.servers[0]}: "
                    + self.log_tail(self.servers[0])
                )
            time.sleep(0.2)

    def log_tail(self, server: str) -> str:
        try:
            text = self.log_path(server).read_text(errors="replace")[-2000:]
        except OSError:
            return "(no output)"
        return text.replace(self.secret_key, "***") or "(no output)"

    # ------------------------------------------------------------------ helpers

    def _drives(self, server: str) -> list[Path]:
        return [self.workdir / f"{server}{n}" for n in range(1, self.drives_per_server + 1)]

    def log_path(self, server: str) -> Path:
        return self.workdir / f"{server}.log"

    def _make_network(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("netns", "add", self._hub)
        _ip("-n", self._hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._hub, "link", "set", "br0", "up")
        # The host's end, and one link per server namespace, each plugged into br0.
        _ip("link", "add", "name", self._host_link, "type", "veth", "peer", "name", "host",
            "netns", self._hub)  # fmt: skip
        _ip("addr", "add", f"{self.host_address}/{prefix}", "dev", self._host_link)
        _ip("link", "set", self._host_link, "up")
        ports = ["host"]
        for server, namespace in self._namespaces.items():
            _ip("netns", "add", namespace)
            _ip("-n", self._hub, "link", "add", "name", self._port(server), "type", "veth",
                "peer", "name", "eth0", "netns", namespace)  # fmt: skip
            _ip("-n", namespace, "addr", "add", f"{self.addresses[server]}/{prefix}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            ports.append(self._port(server))
        for port in ports:
            _ip("-n", self._hub, "link", "set", port, "master", "br0")
            _ip("-n", self._hub, "link", "set", port, "up")

    def pid(self, server: str) -> int:
        return self._processes[server].pid

    @staticmethod
    def _port(server: str) -> str:
        """The hub's end of the server's link."""
        return f"to-{server}"

    def _bridge_port_state(self, server: str, state: str) -> None:
        result = subprocess.run(
            ["ip", "netns", "exec", self._hub, "bridge", "link", "set", "dev", self._port(server),
             "state", state],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"setting {server}'s bridge port {state}: {result.stderr.strip()}")

    def _spawn(self, server: str) -> None:
        drives = [
            f"http://{self.addresses[peer]}:{PORT}{drive}"
            for peer in self.servers
            for drive in self._drives(peer)
        ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            # Drives on the root filesystem are refused outside CI/CD mode.
            "MINIO_CI_CD": "on",
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        with open(self.log_path(server), "ab") as output:
            self._processes[server] = subprocess.Popen(
                ["ip", "netns", "exec", self._namespaces[server], str(self.binary), "server",
                 "--quiet", "--address", f"{self.addresses[server]}:{PORT}", *drives],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    def _terminate(self, server: str) -> None:
        process = self._processes.pop(server)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)

    def _version(self) -> str:
        """The module version the binary was built from (``go install`` leaves MinIO's
        own version string at DEVELOPMENT.GOGET). Go's own installer puts go where a
        non-login shell (the microVM's) may not have it on PATH."""
        for go in ("go", "/usr/local/go/bin/go"):
            try:
                result = subprocess.run(
                    [go, "version", "-m", str(self.binary)], capture_output=True, text=True,
                    timeout=30,
                )  # fmt: skip
            except OSError:
                continue
            for line in result.stdout.splitlines():
                fields = line.split()
                if fields[:2] == ["mod", "github.com/minio/minio"] and len(fields) > 2:
                    return fields[2]
        return "unknown version"
