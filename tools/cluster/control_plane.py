"""The test cluster's control plane on the host: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, each a child process on loopback with its
log in the run directory; and when asked, the snapshot API, a cluster add-on as in most
distributions: its CRDs and the snapshot controller (make cluster-build's
snapshot-crds and snapshot-controller), with the admin's credentials.

The node runs in the microVM, which reaches the host only through QEMU's forwards to
the host's loopback: the API server listens on 127.0.0.1 and advertises the guest's
forward address, so the kubernetes Service's endpoint is one the node (and its pods,
through kube-proxy) can reach.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from node_tunnel import EGRESS_CONFIG
from pki import Pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_API_ADDRESS = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"


@dataclass(frozen=True)
class Endpoints:
    api_port: int
    etcd_port: int
    etcd_peer_port: int
    advertise_address: str  # how the node reaches the API server

    @property
    def host_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def node_url(self) -> str:
        return f"https://{self.advertise_address}:{self.api_port}"


class ComponentFailed(RuntimeError):
    """A component exited or never became ready; the message names its log."""


@dataclass
class ControlPlane:
    binaries: Path
    pki: Pki
    run_dir: Path
    endpoints: Endpoints
    # With it the chart adds its csi-snapshotter to each controller pod, which the node's
    # two emulated cores feel: the short e2e's steps took 743 s with it, 330 s without.
    snapshot_api: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        etcd_url = f"http://127.0.0.1:{self.endpoints.etcd_port}"
        self._spawn(
            "etcd",
            f"--data-dir={self.run_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{self.endpoints.etcd_peer_port}",
            "--unsafe-no-fsync",
        )
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--advertise-address={self.endpoints.advertise_address}",
            f"--secure-port={self.endpoints.api_port}",
            f"--tls-cert-file={pki.cert('apiserver')}",
            f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.ca}",
            f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
            f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
            f"--kubelet-certificate-authority={pki.ca}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.service_account_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--egress-selector-config-file={self._egress_config()}",
        )
        self._wait_ready("kube-apiserver", f"{self.endpoints.host_url}/readyz", ready_timeout_s)
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={self.kubeconfig('controller-manager')}",
            f"--authentication-kubeconfig={self.kubeconfig('controller-manager')}",
            f"--authorization-kubeconfig={self.kubeconfig('controller-manager')}",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca}",
            "--use-service-account-credentials=true",
            f"--cluster-cidr={POD_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={self.kubeconfig('scheduler')}",
            f"--authentication-kubeconfig={self.kubeconfig('scheduler')}",
            f"--authorization-kubeconfig={self.kubeconfig('scheduler')}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
        )
        if self.snapshot_api:
            self._start_snapshot_api(ready_timeout_s)

    def _start_snapshot_api(self, timeout_s: float) -> None:
        crds = self.binaries / "crds" / "snapshot"
        if not crds.is_dir():
            raise ComponentFailed(f"no {crds}: run make cluster-build")
        admin = str(self.kubeconfig("admin"))
        kubectl = [str(self.binaries / "kubectl"), f"--kubeconfig={admin}"]
        established = ["--for=condition=established", f"--timeout={timeout_s:g}s"]
        with self.log("snapshot-crds").open("ab") as log:
            for step in (["apply", "-f", str(crds)], ["wait", *established, "-f", str(crds)]):
                done = subprocess.run([*kubectl, *step], stdout=log, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise ComponentFailed(
                        f"the snapshot CRDs ({crds}) were not established; the log: "
                        f"{self.log('snapshot-crds')}"
                    )
        self._spawn("snapshot-controller", f"--kubeconfig={admin}", "--leader-election=false")

    def _egress_config(self) -> Path:
        path = self.run_dir / "egress-selector.yaml"
        path.write_text(EGRESS_CONFIG.format(socket=self.tunnel_socket))
        return path

    @property
    def tunnel_socket(self) -> Path:
        """Where the API server finds its way to the node (node_tunnel.py)."""
        return self.run_dir / "node-tunnel.sock"

    def kubeconfig(self, identity: str, *, for_node: bool = False) -> Path:
        """A kubeconfig for one identity of the PKI; ``for_node``: the node's address."""
        url = self.endpoints.node_url if for_node else self.endpoints.host_url
        path = self.run_dir / f"{identity}{'-node' if for_node else ''}.kubeconfig"
        # Its owner's only, as kubectl and helm expect of a file naming a client key.
        path.touch(mode=0o600)
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: zerofs-test\n  cluster:\n"
            f"    server: {url}\n    certificate-authority: {self.pki.ca}\n"
            f"users:\n- name: {identity}\n  user:\n"
            f"    client-certificate: {self.pki.cert(identity)}\n"
            f"    client-key: {self.pki.key(identity)}\n"
            "contexts:\n- name: zerofs-test\n  context:\n"
            f"    cluster: zerofs-test\n    user: {identity}\n"
            "current-context: zerofs-test\n"
        )
        return path

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ComponentFailed(
                    f"{name} exited with status {process.returncode}; its log: {self.log(name)}"
                )

    def stop(self) -> None:
        """Stop in reverse order of start, each given a few seconds to exit."""
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def _spawn(self, name: str, *args: str) -> None:
        binary = self.binaries / name
        if not os.access(binary, os.X_OK):
            raise ComponentFailed(f"no {binary}: run make cluster-build")
        with self.log(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [str(binary), *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_ready(self, name: str, url: str, timeout_s: float) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(self.pki.cert("admin"), self.pki.key("admin"))
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise ComponentFailed(
            f"{name} not ready after {timeout_s:g} s ({last}); its log: {self.log(name)}"
        )
