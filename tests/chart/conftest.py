"""Fixtures for the chart tests: Helm (installed by tools/helm.sh), chart rendering, and
kubernetes-validate's offline Kubernetes schemas."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zerofs-csi"
VALIDATION_CHART = ROOT / "charts" / "zerofs-csi-validation"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HELM_SCRIPT = ROOT / "tools" / "helm.sh"
HELM = ROOT / "node_modules" / ".bin" / "helm"
RELEASE = "zerofs"
NAMESPACE = "zerofs-system"
# The oldest Kubernetes release the chart supports (Chart.yaml kubeVersion).
OLDEST_SUPPORTED = (1, 29)

# The realistic values files of the driver chart; None is the chart's defaults.
DRIVER_VALUES: tuple[str | None, ...] = (
    None,
    "minimal-s3.yaml",
    "existing-secret-monitoring.yaml",
    "local-k3s.yaml",
)
VALIDATION_VALUES: tuple[str | None, ...] = (None, "validation-soak.yaml")

Manifest = dict[str, Any]


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> HelmResult:
        done = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        return HelmResult(done.returncode, done.stdout, done.stderr)

    def template(
        self,
        chart: Path,
        values: str | None = None,
        *,
        kube_version: str = "1.31.0",
        sets: Sequence[str] = (),
        api_versions: Sequence[str] = (),
    ) -> HelmResult:
        args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
        args += ["--kube-version", kube_version]
        if values is not None:
            args += ["--values", str(VALUES_DIR / values)]
        for item in sets:
            args += ["--set", item]
        for api in api_versions:
            args += ["--api-versions", api]
        return self.run(*args)

    def render(self, chart: Path, values: str | None = None, **kwargs: Any) -> list[Manifest]:
        result = self.template(chart, values, **kwargs)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def helm() -> Helm:
    # tools/helm.sh installs Helm into node_modules/ when missing (npm), then runs it.
    done = subprocess.run(
        [str(HELM_SCRIPT), "version", "--short"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if done.returncode != 0:
        pytest.fail(f"tools/helm.sh could not provide Helm:\n{done.stderr}")
    return Helm(HELM)


def _import_kubernetes_validate() -> ModuleType | None:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        return None


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    module = _import_kubernetes_validate()
    if module is None:
        # Until the dev extra lists it: install it into the environment running the tests.
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "kubernetes-validate"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        importlib.invalidate_caches()
        module = _import_kubernetes_validate()
        if module is None:
            pytest.skip(
                "kubernetes-validate (PyPI) is not installed and pip could not install it: "
                + install.stderr.strip()[-300:]
            )
    return module


def supported_versions(kubernetes_validate: ModuleType) -> list[str]:
    """Every minor release from the chart's oldest to the newest the schemas cover."""
    latest = tuple(int(part) for part in kubernetes_validate.latest_version().split(".")[:2])
    assert latest >= OLDEST_SUPPORTED, f"kubernetes-validate only has schemas up to {latest}"
    return [f"1.{minor}" for minor in range(OLDEST_SUPPORTED[1], latest[1] + 1)]


def find(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    matches = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, got {len(matches)}"
    return matches[0]


def all_containers(pod_spec: Manifest) -> list[Manifest]:
    """The pod's init containers (sidecars among them), then its containers."""
    return [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]


def container(pod_spec: Manifest, name: str) -> Manifest:
    """The pod's container or init container ``name``."""
    for item in all_containers(pod_spec):
        if item["name"] == name:
            return dict(item)
    raise AssertionError(f"no container {name} in {[c['name'] for c in all_containers(pod_spec)]}")


def port_number(item: Manifest, name: str) -> int:
    """The number of container ``item``'s port ``name``."""
    (port,) = [p["containerPort"] for p in item["ports"] if p["name"] == name]
    return int(port)


RenderFn = Callable[..., list[Manifest]]
