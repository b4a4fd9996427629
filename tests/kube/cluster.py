"""An API server for the Kubernetes backend tests: real (envtest) or the in-process fake.

With ``KUBEBUILDER_ASSETS`` set (the envtest convention: a folder holding
``kube-apiserver`` and ``etcd``), etcd and kube-apiserver are started on loopback with
static token authentication and RBAC authorization; otherwise ``FakeApiServer`` serves.
Both give an admin client, a namespace and the node DaemonSet, so one set of test
bodies runs against either. There is no controller-manager: no garbage collector, no
namespace finalization; pods are bound by ``spec.nodeName`` and their status is set by
the kubelet stand-in.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client

from kube.fake_apiserver import FakeApiServer
from zerofs_csi.bench.plugin import free_tcp_port

ASSETS_ENV = "KUBEBUILDER_ASSETS"
NODE = "node-a"
OTHER_NODE = "node-b"
DAEMONSET = "zerofs-csi-node"
# The node DaemonSet's pods carry these; the volume server pods must not match them.
DAEMONSET_LABELS = {"app.kubernetes.io/name": "zerofs-csi", "app.kubernetes.io/component": "node"}


@dataclass
class Cluster:
    kind: str  # "fake" or "real"
    url: str
    admin_token: str | None
    namespace: str
    fake: FakeApiServer | None = None
    # Bearer tokens of non-admin users the server knows (real server only).
    user_tokens: dict[str, str] = field(default_factory=dict)
    _clients: list[client.ApiClient] = field(default_factory=list)

    def api_client(self, token: str | None = None) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        bearer = token or self.admin_token
        if bearer:
            configuration.api_key = {"authorization": f"Bearer {bearer}"}
        # A throw-away self-signed serving certificate on loopback.
        configuration.verify_ssl = False
        api = client.ApiClient(configuration)
        self._clients.append(api)
        return api

    def close(self) -> None:
        for api in self._clients:
            api.close()

    def create_daemonset(self, api: client.ApiClient) -> dict[str, Any]:
        body = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": DAEMONSET, "namespace": self.namespace},
            "spec": {
                "selector": {"matchLabels": dict(DAEMONSET_LABELS)},
                "template": {
                    "metadata": {"labels": dict(DAEMONSET_LABELS)},
                    "spec": {"containers": [{"name": "plugin", "image": "zerofs-csi:test"}]},
                },
            },
        }
        created = client.AppsV1Api(api).create_namespaced_daemon_set(
            self.namespace, body, _preload_content=False
        )
        return dict(json.loads(created.data))


def _create_namespace(api: client.ApiClient, name: str) -> None:
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})


@contextmanager
def fake_cluster() -> Iterator[Cluster]:
    server = FakeApiServer().start()
    cluster = Cluster("fake", server.url, None, "zerofs", fake=server)
    try:
        _create_namespace(cluster.api_client(), cluster.namespace)
        yield cluster
    finally:
        cluster.close()
        server.stop()


@dataclass
class RealApiServer:
    url: str
    admin_token: str
    user_tokens: dict[str, str]
    processes: list[subprocess.Popen[bytes]]
    workdir: Path

    def stop(self, keep_logs: bool = False) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)


# Users of the real server besides the admin: the node plugin, restricted by a Role.
NODE_PLUGIN_USER = "zerofs-csi-node"


def start_real_apiserver(assets: Path) -> RealApiServer:
    """etcd and kube-apiserver from ``assets`` on loopback; raises when either fails."""
    for binary in ("etcd", "kube-apiserver"):
        if not os.access(assets / binary, os.X_OK):
            raise RuntimeError(f"{ASSETS_ENV}={assets} has no executable {binary}")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is needed to make the service account key (apt-get openssl)")
    workdir = Path(tempfile.mkdtemp(prefix="zerofs-envtest-"))
    processes: list[subprocess.Popen[bytes]] = []
    server = None
    try:
        etcd_port, peer_port, api_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        processes.append(
            subprocess.Popen(
                [
                    str(assets / "etcd"),
                    "--data-dir",
                    str(workdir / "etcd"),
                    "--listen-client-urls",
                    etcd_url,
                    "--advertise-client-urls",
                    etcd_url,
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                ],
                stdout=(workdir / "etcd.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        key = workdir / "service-account.key"
        subprocess.run(
            [openssl, "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        admin_token = secrets.token_hex(16)
        user_tokens = {NODE_PLUGIN_USER: secrets.token_hex(16)}
        tokens = workdir / "tokens.csv"
        lines = [f'{admin_token},admin,{uuid.uuid4()},"system:masters"']
        lines += [f"{token},{user},{uuid.uuid4()}" for user, token in user_tokens.items()]
        tokens.write_text("\n".join(lines) + "\n")
        processes.append(
            subprocess.Popen(
                [
                    str(assets / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--cert-dir={workdir / 'certs'}",
                    f"--token-auth-file={tokens}",
                    "--authorization-mode=RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={key}",
                    f"--service-account-signing-key-file={key}",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    # No controller-manager creates the default service account.
                    "--disable-admission-plugins=ServiceAccount",
                    "--allow-privileged=true",
                    # The endpoint reconciler refuses a loopback advertise address, and
                    # nothing here reaches the API through the kubernetes Service.
                    "--endpoint-reconciler-type=none",
                ],
                stdout=(workdir / "kube-apiserver.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        server = RealApiServer(
            f"https://127.0.0.1:{api_port}", admin_token, user_tokens, processes, workdir
        )
        _wait_ready(server)
        return server
    except BaseException:
        if server is not None:
            # The error names the logs: keep them.
            server.stop(keep_logs=True)
        else:
            for process in processes:
                process.kill()
                process.wait()
        raise


def _wait_ready(server: RealApiServer, timeout: float = 90.0) -> None:
    http = urllib3.PoolManager(cert_reqs="CERT_NONE")
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for process in server.processes:
            if process.poll() is not None:
                name = Path(str(process.args[0])).name
                log = server.workdir / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-3:]
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; its log {log} ends with:\n"
                    + "\n".join(tail)
                )
        try:
            response = http.request(
                "GET",
                f"{server.url}/readyz",
                headers={"Authorization": f"Bearer {server.admin_token}"},
                timeout=5,
            )
            if response.status == 200:
                return
            last = f"{response.status} {response.data[:200]!r}"
        except urllib3.exceptions.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"kube-apiserver not ready after {timeout:g}s: {last}")


@contextmanager
def real_cluster(server: RealApiServer) -> Iterator[Cluster]:
    # No namespace controller runs, so a deleted namespace would never go away: each
    # test gets a fresh one.
    namespace = f"zerofs-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(
        "real", server.url, server.admin_token, namespace, user_tokens=server.user_tokens
    )
    try:
        _create_namespace(cluster.api_client(), namespace)
        yield cluster
    finally:
        cluster.close()
