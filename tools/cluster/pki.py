"""The test cluster's certificates: one CA, the API server's serving certificate and a
client certificate per component, made with openssl once and kept (idempotent).

Identities follow what the API server's default RBAC and Node authorizer expect:
``system:masters`` for the admin, ``system:node:<node>`` in ``system:nodes`` for the
kubelet, and the built-in users of the controller-manager, scheduler and kube-proxy.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Who may reach the API server, and by which address: the host's loopback, the guest's
# forward to it, and the kubernetes Service's cluster IP (the first of the range).
SERVING_NAMES = (
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "DNS:localhost",
)


@dataclass(frozen=True)
class ClientIdentity:
    name: str  # file name stem
    user: str  # certificate CN: the user name
    groups: tuple[str, ...] = ()  # certificate O: the groups


def client_identities(node: str) -> tuple[ClientIdentity, ...]:
    return (
        ClientIdentity("admin", "cluster-admin", ("system:masters",)),
        ClientIdentity("kubelet", f"system:node:{node}", ("system:nodes",)),
        ClientIdentity("controller-manager", "system:kube-controller-manager"),
        ClientIdentity("scheduler", "system:kube-scheduler"),
        ClientIdentity("kube-proxy", "system:kube-proxy"),
        ClientIdentity("apiserver-kubelet-client", "kube-apiserver", ("system:masters",)),
    )


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def service_account_key(self) -> Path:
        return self.directory / "service-account.key"


def ensure_pki(directory: Path, node: str, node_ip: str, addresses: tuple[str, ...]) -> Pki:
    """Make whatever of the PKI is missing; a complete one is left as it is.

    ``addresses`` are the IP addresses the API server is reached at; the kubelet serves
    on ``node_ip``. A change of these or of the node name needs a new directory.
    """
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not pki.ca.exists():
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(pki.key("ca")), "-out", str(pki.ca), "-days", "3650",
            "-subj", "/CN=zerofs-csi test cluster CA",
        )  # fmt: skip
    if not pki.service_account_key.exists():
        _openssl("genrsa", "-out", str(pki.service_account_key), "2048")
    sans = ",".join((*SERVING_NAMES, *(f"IP:{address}" for address in addresses)))
    _issue(pki, "apiserver", "/CN=kube-apiserver", f"subjectAltName={sans}", "serverAuth")
    node_sans = f"subjectAltName=DNS:{node},IP:{node_ip}"
    _issue(pki, "kubelet-serving", f"/CN={node}", node_sans, "serverAuth")
    for identity in client_identities(node):
        subject = "".join(f"/O={group}" for group in identity.groups) + f"/CN={identity.user}"
        _issue(pki, identity.name, subject, None, "clientAuth")
    return pki


def _issue(pki: Pki, name: str, subject: str, san: str | None, usage: str) -> None:
    if pki.cert(name).exists():
        return
    csr = pki.directory / f"{name}.csr"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pki.key(name)), "-out", str(csr), "-subj", subject,
    )  # fmt: skip
    extensions = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature"]
    if san:
        extensions.append(san)
    # The extensions come on stdin: `openssl x509 -req` copies none from the request.
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki.ca),
            "-CAkey",
            str(pki.key("ca")),
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            str(pki.cert(name)) + ".new",
            "-extfile",
            "/dev/stdin",
        ],  # fmt: skip
        input="\n".join(extensions) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    Path(str(pki.cert(name)) + ".new").rename(pki.cert(name))
    csr.unlink()


def _openssl(*argv: str) -> None:
    result = subprocess.run(["openssl", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {argv[0]} failed: {result.stderr.strip()}")
