#!/usr/bin/env python3
"""A single-node Kubernetes cluster built from source: the control plane on this host,
the node (containerd, kubelet, kube-proxy, every pod) in the microVM, whose kernel has
NBD. The guest reaches the host only through QEMU's forwards to the host's loopback:
the API server's port and, with ``--s3``, an S3 store the run starts: a radosgw, or,
when the images hold a real ZeroFS (``images.sh``'s ``zerofs``, made when ZEROFS_BIN
names one), a MinIO server of ``MINIO_BIN``: ZeroFS 2.3 needs conditional writes, which
radosgw 16.2 does not pass.

Usage:
    cluster.py up                 the cluster until ^C; prints the admin KUBECONFIG
    cluster.py run -- CMD ARGS    the cluster, then CMD on this host once the node is
                                  Ready, with KUBECONFIG, the S3 endpoint and
                                  credentials in its environment; the exit status is
                                  CMD's

Needs the builds of ``make cluster-build`` and the images of ``make cluster-images``.
Logs of every component: RUN_DIR/logs/ (printed at the start).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "s3"))
sys.path.insert(0, str(REPO / "tests" / "vm"))

from control_plane import (  # noqa: E402
    POD_CIDR,
    SERVICE_API_ADDRESS,
    ComponentFailed,
    ControlPlane,
    Endpoints,
)
from image_archives import archive_tag  # noqa: E402
from node_tunnel import NodeTunnel  # noqa: E402
from pki import ensure_pki  # noqa: E402
from runner import exit_through_clean_up, machine_cache_dir  # noqa: E402

from zerofs_csi.bench.plugin import free_tcp_port  # noqa: E402

# Each run's directory (logs, kubeconfigs, sockets), in this clone.
RUNS_DIR = REPO / ".cache" / "cluster"
# Kept between runs by every clone on the machine: the CA, the node disk.
CACHE_DIR = machine_cache_dir() / "cluster"
NODE_NAME = "zerofs-vm"
# QEMU user networking (tests/vm/runner.py): the guest's address, and the address its
# forwards to the host's loopback answer on.
NODE_IP = "10.0.2.15"
FORWARD_ADDRESS = "10.0.2.100"
NODE_POD_CIDR = "10.244.0.0/24"
S3_GUEST_PORT = 7480
KUBELET_PORT = 10250
# Host packages the node uses from the host's root: pod networking (CNI bridge's
# masquerade, kube-proxy's rules) and conntrack clean-up.
NODE_PACKAGES = {"iptables": "iptables", "conntrack": "conntrack"}
VM_MEMORY_MIB = 6144
# The node's start, boot to Ready, with every image to import (a node disk made anew):
# well under this; past it, the run stops with the node's logs instead of waiting out
# the whole run's timeout.
NODE_READY_TIMEOUT_S = 1200.0
# node.sh's components, each logging to RUN_DIR/logs/NAME.log.
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy")
# containerd's images between runs (node.sh): sparse, so it takes what the images take.
NODE_DISK = CACHE_DIR / "node-disk.img"
NODE_DISK_BYTES = 16 << 30


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def binaries_dir() -> Path:
    output = subprocess.run(
        [str(HERE / "build.sh"), "--print-dir"], capture_output=True, text=True, check=True
    )
    return Path(output.stdout.strip())


def ensure_node_packages() -> None:
    missing = [package for binary, package in NODE_PACKAGES.items() if not shutil.which(binary)]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (Debian packages; the node runs them)")
    subprocess.run([str(REPO / "tools" / "apt-install"), *missing], check=True, capture_output=True)


def image_list() -> list[str]:
    """Lines "<archive> <repository>" of make cluster-images' archives."""
    result = subprocess.run([str(HERE / "images.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        raise ComponentFailed(f"the images are not built: {result.stderr.strip()}")
    return [line for line in result.stdout.splitlines() if line.strip()]


def pause_image(images: Sequence[str]) -> str:
    for line in images:
        archive, repository = line.split()
        if repository.endswith("/pause"):
            return f"{repository}:{archive_tag(archive, repository)}"
    raise ComponentFailed("make cluster-images built no pause image")


def serves_real_zerofs(images: Sequence[str]) -> bool:
    return any(line.split()[1].endswith("/zerofs") for line in images)


@contextmanager
def s3_gateway(real_zerofs: bool) -> Iterator[dict[str, str]]:
    """The run's S3 store: its endpoints and root credentials for the environment."""
    workdir = Path(tempfile.mkdtemp(prefix="zerofs-cluster-s3-"))
    try:
        with s3_store(workdir, real_zerofs) as (endpoint, access_key, secret_key):
            port = endpoint.rsplit(":", 1)[1]
            yield {
                # The node's pods reach S3 here; this host at S3_HOST_ENDPOINT.
                "S3_HOST_ENDPOINT": endpoint,
                "S3_HOST_PORT": port,
                "S3_ENDPOINT": f"http://{FORWARD_ADDRESS}:{S3_GUEST_PORT}",
                "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key,
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def s3_store(workdir: Path, real_zerofs: bool) -> Iterator[tuple[str, str, str]]:
    if real_zerofs:
        from minio_server import MinioServer

        binary = os.environ.get("MINIO_BIN", "")
        if not binary or not os.access(binary, os.X_OK):
            raise ComponentFailed(
                "a real ZeroFS needs MinIO for its volumes: set MINIO_BIN (make minio builds it)"
            )
        minio = MinioServer(workdir, Path(binary))
        minio.start()
        try:
            log(f"S3: MinIO at {minio.endpoint} (the images hold a real ZeroFS)")
            yield minio.endpoint, minio.access_key, minio.secret_key
        finally:
            minio.stop()
        return
    from radosgw import RadosGateway, ensure_installed

    ensure_installed()
    gateway = RadosGateway(workdir)
    gateway.start()
    try:
        yield gateway.endpoint, gateway.access_key, gateway.secret_key
    finally:
        gateway.stop()


def node_environment(plane: ControlPlane, binaries: Path, images: Sequence[str]) -> dict[str, str]:
    return {
        "BINARIES": str(binaries),
        "NODE_NAME": NODE_NAME,
        "NODE_IP": NODE_IP,
        "NODE_POD_CIDR": NODE_POD_CIDR,
        "POD_CIDR": POD_CIDR,
        "SERVICE_API_ADDRESS": SERVICE_API_ADDRESS,
        "CA_FILE": str(plane.pki.ca),
        "KUBELET_TLS_CERT": str(plane.pki.cert("kubelet-serving")),
        "KUBELET_TLS_KEY": str(plane.pki.key("kubelet-serving")),
        "PAUSE_IMAGE": pause_image(images),
        "KUBELET_KUBECONFIG": str(plane.kubeconfig("kubelet", for_node=True)),
        "KUBE_PROXY_KUBECONFIG": str(plane.kubeconfig("kube-proxy", for_node=True)),
        "ADMIN_KUBECONFIG": str(plane.kubeconfig("admin", for_node=True)),
        "IMAGES_FILE": str(plane.run_dir / "images.txt"),
        "NODE_DISK": "/dev/vda",
    }


def run_cluster(
    command: Sequence[str], *, with_s3: bool, timeout_s: float, snapshot_api: bool = False
) -> int:
    ensure_node_packages()
    binaries = binaries_dir()
    images = image_list()
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    pki = ensure_pki(
        CACHE_DIR / "pki",
        NODE_NAME,
        NODE_IP,
        ("127.0.0.1", FORWARD_ADDRESS, SERVICE_API_ADDRESS),
    )
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%dT%H%M%S-"), dir=RUNS_DIR))
    log(f"run directory {run_dir} (logs in {run_dir / 'logs'})")
    endpoints = Endpoints(
        api_port=free_tcp_port(),
        etcd_port=free_tcp_port(),
        etcd_peer_port=free_tcp_port(),
        advertise_address=FORWARD_ADDRESS,
    )
    plane = ControlPlane(binaries, pki, run_dir, endpoints, snapshot_api=snapshot_api)
    kubelet_port = free_tcp_port()
    # The API server dials the node by its name or its address, whichever it prefers.
    kubelet = ("127.0.0.1", kubelet_port)
    tunnel = NodeTunnel(
        plane.tunnel_socket,
        {f"{NODE_NAME}:{KUBELET_PORT}": kubelet, f"{NODE_IP}:{KUBELET_PORT}": kubelet},
    ).start()
    started = time.monotonic()
    try:
        plane.start()
        log(f"control plane up in {time.monotonic() - started:.1f} s at {endpoints.host_url}")
        log(f"KUBECONFIG={plane.kubeconfig('admin')}")
        with s3_or_nothing(with_s3, serves_real_zerofs(images)) as s3:
            env = node_environment(plane, binaries, images)
            (run_dir / "node.env").write_text(
                "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
            )
            os.chmod(run_dir / "node.env", 0o600)
            (run_dir / "images.txt").write_text("\n".join(images) + "\n")
            forwards = [f"{endpoints.api_port}:{endpoints.api_port}"]
            if s3:
                forwards.append(f"{S3_GUEST_PORT}:{s3['S3_HOST_PORT']}")
            vm = [
                sys.executable,
                str(REPO / "tests" / "vm" / "runner.py"),
                "--timeout",
                str(timeout_s),
                "--mem",
                str(VM_MEMORY_MIB),
                *(arg for forward in forwards for arg in ("--forward", forward)),
                "--host-forward",
                f"{kubelet_port}:{KUBELET_PORT}",
                "--disk",
                str(NODE_DISK),
                # Room for the whole run's kernel log (e2e.py reads it at the end).
                "--kernel-arg",
                "log_buf_len=16M",
                "--",
                str(HERE / "node.sh"),
                str(run_dir),
            ]
            with node_disk(), archives_held(binaries), node_vm(vm, run_dir) as node:
                wait_for_node(node, run_dir, plane, min(timeout_s, NODE_READY_TIMEOUT_S))
                log(f"node Ready {time.monotonic() - started:.1f} s after the start")
                host_env = {
                    **os.environ,
                    **s3,
                    "KUBECONFIG": str(plane.kubeconfig("admin")),
                    "KUBECTL": str(binaries / "kubectl"),
                    "NODE_NAME": NODE_NAME,
                    "IMAGES_FILE": str(run_dir / "images.txt"),
                    "CLUSTER_RUN_DIR": str(run_dir),
                }
                return subprocess.run(command, cwd=REPO, env=host_env).returncode
    except ComponentFailed as exc:
        log(str(exc))
        return 1
    finally:
        plane.stop()
        tunnel.stop()


@contextmanager
def node_disk() -> Iterator[None]:
    """The node disk, held for the run: one cluster at a time uses it."""
    with open(NODE_DISK, "a+b") as disk:
        try:
            fcntl.flock(disk, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another cluster run holds {NODE_DISK}; waiting for it")
            fcntl.flock(disk, fcntl.LOCK_EX)
        if os.fstat(disk.fileno()).st_size != NODE_DISK_BYTES:
            disk.truncate(NODE_DISK_BYTES)
        yield


@contextmanager
def archives_held(binaries: Path) -> Iterator[None]:
    """images.sh's lock, shared: no image is rebuilt (its archive replaced) while the node
    may still be importing it."""
    with open(binaries / "images" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


@contextmanager
def node_vm(argv: Sequence[str], run_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The microVM running node.sh; stopped (RUN_DIR/stop, then SIGTERM) on the way out."""
    node = subprocess.Popen(argv, cwd=REPO)
    try:
        yield node
    finally:
        (run_dir / "stop").touch()
        try:
            node.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node.terminate()
            node.wait()


def wait_for_node(
    node: subprocess.Popen[bytes], run_dir: Path, plane: ControlPlane, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "node-ready").exists():
        plane.check_running()
        if node.poll() is not None:
            raise ComponentFailed(
                f"the node's VM exited with status {node.returncode} before the node was "
                f"Ready; logs: {run_dir / 'logs'}\n{node_log_tails(plane)}"
            )
        if time.monotonic() > deadline:
            raise ComponentFailed(
                f"the node was not Ready within {timeout_s:g} s; logs: {run_dir / 'logs'}\n"
                f"{node_log_tails(plane)}"
            )
        time.sleep(1)


def node_log_tails(plane: ControlPlane, lines: int = 15) -> str:
    """The last lines of the node's components' logs (node.sh writes them where the
    control plane's are): what a CI log shows of a failure."""
    tails = []
    for name in NODE_COMPONENTS:
        path = plane.log(name)
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            continue
        tails.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(tails) or "(the node wrote no log)"


@contextmanager
def s3_or_nothing(with_s3: bool, real_zerofs: bool) -> Iterator[dict[str, str]]:
    if not with_s3:
        yield {}
        return
    with s3_gateway(real_zerofs) as s3:
        yield s3


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/cluster/cluster.py")
    parser.add_argument("action", choices=("up", "run"))
    parser.add_argument("--s3", action="store_true", help="start an S3 store the node reaches")
    parser.add_argument("--timeout", type=float, default=3600.0, help="the VM's whole run, s")
    parser.add_argument(
        "--snapshot-api",
        action="store_true",
        help="serve the snapshot API (its CRDs and the snapshot controller), with which the "
        "chart adds its csi-snapshotter and VolumeSnapshotClass",
    )
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    if args.action == "up":
        if command:
            parser.error("up takes no command")
        command = [
            "sh",
            "-c",
            'echo "cluster: up; KUBECONFIG=$KUBECONFIG (^C stops it)"; exec sleep infinity',
        ]
    elif not command:
        parser.error("run needs a command after --")
    return run_cluster(
        command, with_s3=args.s3, timeout_s=args.timeout, snapshot_api=args.snapshot_api
    )


if __name__ == "__main__":
    # The control plane's processes live in sessions of their own and would outlive us.
    exit_through_clean_up(main, log)
