"""The project's stand-ins for node-driver-registrar and livenessprobe
(tools/cluster/sidecars/), run with the flags the chart gives them against the real
plugin process: the registrar's socket is driven as kubelet's plugin watcher drives it,
over the real unix socket, and the probes' HTTP answers are read as kubelet reads them."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from chart.conftest import CHART, Helm, all_containers, container, find

from zerofs_csi.bench.plugin import free_tcp_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SIDECARS = ROOT / "tools" / "cluster" / "sidecars"
REGISTRAR = SIDECARS / "node_driver_registrar.py"
LIVENESSPROBE = SIDECARS / "livenessprobe.py"
DRIVER = "zerofs.csi.driver"
# Where the chart's DaemonSet mounts the plugin's socket directory in every container.
CHART_SOCKET = "/csi/csi.sock"
START_TIMEOUT_S = 60.0


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@dataclass
class Process:
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The modules of the registration API and of CSI, generated as the image build
    generates them."""
    dest = tmp_path_factory.mktemp("stubs")
    protos = [SIDECARS / "pluginregistration.proto", ROOT / "proto" / "csi.proto"]
    subprocess.run(
        [sys.executable, str(SIDECARS / "generate_stubs.py"), str(dest), *map(str, protos)],
        check=True,
        timeout=120,
    )
    return dest


@pytest.fixture(scope="session")
def registration(stubs: Path) -> tuple[object, object]:
    """The generated modules, as kubelet's side of the API."""
    sys.path.insert(0, str(stubs))
    import pluginregistration_pb2
    import pluginregistration_pb2_grpc

    return pluginregistration_pb2, pluginregistration_pb2_grpc


@pytest.fixture(scope="session")
def chart_args(helm: Helm) -> dict[tuple[str, str], list[str]]:
    """(workload kind, container name) -> the args the chart gives that container."""
    manifests = helm.render(CHART)
    args = {}
    for kind in ("DaemonSet", "Deployment"):
        spec = find(manifests, kind)["spec"]["template"]["spec"]
        for name in ("node-driver-registrar", "liveness-probe"):
            if any(c["name"] == name for c in all_containers(spec)):
                args[(kind, name)] = list(container(spec, name)["args"])
    return args


def localized(args: list[str], **values: str) -> list[str]:
    """The chart's args with the named flags' values replaced (flag_name=value), each of
    which the chart must pass."""
    out, replaced = [], set()
    for arg in args:
        flag, _, _ = arg.partition("=")
        key = flag.removeprefix("--").replace("-", "_")
        if key in values:
            arg = f"{flag}={values[key]}"
            replaced.add(key)
        out.append(arg)
    assert replaced == set(values), f"the chart passes no {set(values) - replaced} in {args}"
    return out


def start_plugin(processes: list[Process], workdir: Path, role: str) -> Path:
    socket_path = workdir / "csi.sock"
    workdir.mkdir(parents=True, exist_ok=True)
    plugin = Process(
        [sys.executable, "-m", "zerofs_csi", "--role", role, "--node-id", "node-a",
         "--endpoint", f"unix://{socket_path}", "--metrics-address", "",
         "--backend", "local", "--state-dir", str(workdir / "state")],
        workdir / "plugin.log",
    ).start()  # fmt: skip
    processes.append(plugin)
    wait_until(
        lambda: socket_path.exists() or not plugin.running(), START_TIMEOUT_S, "the plugin's socket"
    )
    assert plugin.running(), plugin.output()
    return socket_path


def start_sidecar(
    processes: list[Process], script: Path, args: list[str], log: Path, stubs: Path
) -> Process:
    env = dict(os.environ, PYTHONPATH=str(stubs))
    sidecar = Process([sys.executable, str(script), *args], log, env=env).start()
    processes.append(sidecar)
    return sidecar


def registrar_args(
    chart_args: dict[tuple[str, str], list[str]], csi_socket: Path, registry: Path, port: int
) -> list[str]:
    args = localized(
        chart_args[("DaemonSet", "node-driver-registrar")],
        csi_address=str(csi_socket),
        http_endpoint=f"127.0.0.1:{port}",
    )
    # The chart mounts kubelet's plugins_registry at the registrar's default, /registration.
    return [*args, f"--plugin-registration-path={registry}"]


def chart_registration_path(chart_args: dict[tuple[str, str], list[str]]) -> str:
    for arg in chart_args[("DaemonSet", "node-driver-registrar")]:
        if arg.startswith("--kubelet-registration-path="):
            return arg.partition("=")[2]
    raise AssertionError("the chart passes no --kubelet-registration-path")


def test_registrar_serves_kubelet_registration_and_exits_when_refused(
    tmp_path: Path,
    processes: list[Process],
    stubs: Path,
    registration: tuple[object, object],
    chart_args: dict[tuple[str, str], list[str]],
) -> None:
    api, api_grpc = registration
    csi_socket = start_plugin(processes, tmp_path / "node", "node")
    registry = tmp_path / "plugins_registry"
    registry.mkdir()
    port = free_tcp_port()
    registrar = start_sidecar(
        processes,
        REGISTRAR,
        registrar_args(chart_args, csi_socket, registry, port),
        tmp_path / "registrar.log",
        stubs,
    )
    reg_socket = registry / f"{DRIVER}-reg.sock"
    wait_until(
        lambda: reg_socket.exists() or not registrar.running(),
        START_TIMEOUT_S,
        "the registration socket",
    )
    mode = reg_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert mode & 0o077 == 0, f"registration socket mode {oct(mode)}: others may connect"

    with grpc.insecure_channel(f"unix:{reg_socket}") as channel:
        kubelet = api_grpc.RegistrationStub(channel)  # type: ignore[attr-defined]
        info = kubelet.GetInfo(api.InfoRequest(), timeout=10)  # type: ignore[attr-defined]
        assert info.type == "CSIPlugin"
        assert info.name == DRIVER
        assert info.endpoint == chart_registration_path(chart_args)
        assert list(info.supported_versions) == ["1.0.0"]
        assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok")

        kubelet.NotifyRegistrationStatus(
            api.RegistrationStatus(plugin_registered=True),  # type: ignore[attr-defined]
            timeout=10,
        )
        time.sleep(1)
        assert registrar.running(), registrar.output()

        kubelet.NotifyRegistrationStatus(
            api.RegistrationStatus(  # type: ignore[attr-defined]
                plugin_registered=False, error="plugin version not supported"
            ),
            timeout=10,
        )
    assert registrar.wait() == 1
    assert "plugin version not supported" in registrar.output()
    assert not reg_socket.exists()


def test_registrar_waits_for_the_driver_and_removes_its_socket_on_sigterm(
    tmp_path: Path,
    processes: list[Process],
    stubs: Path,
    registration: tuple[object, object],
    chart_args: dict[tuple[str, str], list[str]],
) -> None:
    api, api_grpc = registration
    workdir = tmp_path / "node"
    registry = tmp_path / "plugins_registry"
    registry.mkdir()
    port = free_tcp_port()
    reg_socket = registry / f"{DRIVER}-reg.sock"
    # A socket left by an earlier registrar is replaced.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(reg_socket))
    registrar = start_sidecar(
        processes,
        REGISTRAR,
        registrar_args(chart_args, workdir / "csi.sock", registry, port),
        tmp_path / "registrar.log",
        stubs,
    )
    time.sleep(2)
    assert registrar.running(), registrar.output()
    start_plugin(processes, workdir, "node")
    with grpc.insecure_channel(f"unix:{reg_socket}") as channel:
        kubelet = api_grpc.RegistrationStub(channel)  # type: ignore[attr-defined]
        info = kubelet.GetInfo(
            api.InfoRequest(),  # type: ignore[attr-defined]
            timeout=START_TIMEOUT_S,
            wait_for_ready=True,
        )
    assert info.name == DRIVER

    reg_socket.unlink()
    assert http_get(f"http://127.0.0.1:{port}/healthz") == (
        404,
        "registration socket does not exist",
    )
    registrar.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert registrar.wait() == 0


def test_registrar_leaves_a_file_that_is_not_a_socket_alone(
    tmp_path: Path,
    processes: list[Process],
    stubs: Path,
    chart_args: dict[tuple[str, str], list[str]],
) -> None:
    csi_socket = start_plugin(processes, tmp_path / "node", "node")
    registry = tmp_path / "plugins_registry"
    registry.mkdir()
    squatter = registry / f"{DRIVER}-reg.sock"
    squatter.write_text("not ours")
    registrar = start_sidecar(
        processes,
        REGISTRAR,
        registrar_args(chart_args, csi_socket, registry, free_tcp_port()),
        tmp_path / "registrar.log",
        stubs,
    )
    assert registrar.wait(timeout=START_TIMEOUT_S) != 0
    assert "is not a socket" in registrar.output()
    assert squatter.read_text() == "not ours"


def livenessprobe_args(
    chart_args: dict[tuple[str, str], list[str]], kind: str, csi_socket: Path, port: int
) -> list[str]:
    return localized(
        chart_args[(kind, "liveness-probe")],
        csi_address=str(csi_socket),
        http_endpoint=f"127.0.0.1:{port}",
    )


def probe_timeout(args: list[str]) -> float:
    """The livenessprobe's --probe-timeout in seconds (its default is 1 s)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith("--probe-timeout=")]
    if not values:
        return 1.0
    assert values[-1].endswith("s") and not values[-1].endswith("ms"), values
    return float(values[-1][:-1])


def start_livenessprobe(
    processes: list[Process], stubs: Path, args: list[str], log: Path, port: int
) -> Process:
    probe = start_sidecar(processes, LIVENESSPROBE, args, log, stubs)

    def listening() -> bool:
        if not probe.running():
            return True
        with socket.socket() as client:
            return client.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, START_TIMEOUT_S, "the livenessprobe's HTTP server")
    assert probe.running(), probe.output()
    return probe


def test_livenessprobe_is_ok_while_the_controller_answers_and_fails_once_it_is_gone(
    tmp_path: Path,
    processes: list[Process],
    stubs: Path,
    chart_args: dict[tuple[str, str], list[str]],
) -> None:
    csi_socket = start_plugin(processes, tmp_path / "controller", "controller")
    port = free_tcp_port()
    args = livenessprobe_args(chart_args, "Deployment", csi_socket, port)
    start_livenessprobe(processes, stubs, args, tmp_path / "probe.log", port)
    url = f"http://127.0.0.1:{port}/healthz"
    assert http_get(url) == (200, "ok")

    plugin = processes[0]
    assert plugin.proc is not None
    # Stopped, the plugin accepts connections and answers nothing: the chart's probe
    # timeout decides.
    probe_timeout_s = probe_timeout(args)
    os.kill(plugin.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    status, text = http_get(url)
    assert (status, text.split(":")[0]) == (500, "DEADLINE_EXCEEDED")
    assert probe_timeout_s - 0.1 < time.monotonic() - started < probe_timeout_s + 9
    plugin.kill()
    status, text = http_get(url)
    assert (status, text.split(":")[0]) == (500, "UNAVAILABLE")


def test_livenessprobe_fails_with_the_reason_of_an_unhealthy_node_plugin(
    tmp_path: Path,
    processes: list[Process],
    stubs: Path,
    chart_args: dict[tuple[str, str], list[str]],
) -> None:
    if Path("/sys/module/nbd").exists():
        pytest.skip("the kernel's nbd driver is loaded here, so the node plugin is healthy")
    csi_socket = start_plugin(processes, tmp_path / "node", "node")
    port = free_tcp_port()
    start_livenessprobe(
        processes,
        stubs,
        livenessprobe_args(chart_args, "DaemonSet", csi_socket, port),
        tmp_path / "probe.log",
        port,
    )
    status, text = http_get(f"http://127.0.0.1:{port}/healthz")
    assert status == 500
    assert text.startswith("FAILED_PRECONDITION: plugin is not healthy: the kernel's nbd driver")
