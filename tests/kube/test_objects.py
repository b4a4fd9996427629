"""The Secret and Pod manifests, and the pod's readiness probe against real servers."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from kube.cluster import DAEMONSET_LABELS
from kube.conftest import SECRETS, volume_settings
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.zerofs_config import render_zerofs_config
from zerofs_csi.volume.settings import VolumeSettings

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tools" / "zerofs_standin.py"
VOLUME = "pvc-6f1c2d3e-0a1b-4c5d-8e9f-0123456789ab"
SOCKETS = ServerSockets.under(Path("/var/lib/zerofs-csi/sockets"), VOLUME)
OWNER = objects.daemonset_owner_reference("zerofs-csi-node", "6d0c0f6e-uid")


def build(settings: VolumeSettings, secret_version: str = "uid-1/17") -> dict[str, Any]:
    rendered = render_zerofs_config(
        settings,
        VOLUME,
        SECRETS,
        cache_dir=objects.CACHE_DIR,
        nbd_socket=str(SOCKETS.nbd),
        ninep_socket=str(SOCKETS.ninep),
    )
    return objects.volume_pod(
        volume_id=VOLUME,
        namespace="zerofs",
        node_name="node-a",
        settings=settings,
        sockets=SOCKETS,
        secret_env_names=rendered.secret_env,
        secret_version=secret_version,
        config_text=rendered.toml_text,
        owner=OWNER,
    )


def test_pod_manifest() -> None:
    pod = build(volume_settings(cpuRequest="250m", memoryLimit="2Gi", rustLog="zerofs=debug"))
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert pod["metadata"]["name"] == f"zerofs-volume-{VOLUME}"
    assert spec["nodeName"] == "node-a" and spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == 60
    assert container["args"] == ["run", "--config", "/etc/zerofs/config.toml"]
    # ZeroFS under the fence guard, whose mark and the server's lives are in the volume's
    # socket directory.
    assert container["command"][:2] == ["perl", "-e"]
    assert container["command"][3:] == [
        objects.FENCED_MARKER,
        str(SOCKETS.fenced),
        str(SOCKETS.lives),
        "zerofs",
    ]
    assert container["resources"] == {"requests": {"cpu": "250m"}, "limits": {"memory": "2Gi"}}
    assert {"name": "RUST_LOG", "value": "zerofs=debug"} in container["env"]
    security = container["securityContext"]
    assert security["runAsUser"] == 1001 and security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["sockets"]["hostPath"] == {"path": str(SOCKETS.directory), "type": "Directory"}
    assert volumes["config"]["secret"]["secretName"] == f"zerofs-config-{VOLUME}"
    # 1 GB cache by default, with headroom.
    assert volumes["cache"]["emptyDir"]["sizeLimit"] == "1250000000"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["sockets"] == str(SOCKETS.directory)
    assert mounts["cache"] == objects.CACHE_DIR
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[-2:] == [str(SOCKETS.nbd), str(SOCKETS.ninep)]
    assert "livenessProbe" not in container
    assert pod["metadata"]["ownerReferences"] == [OWNER]
    assert "initContainers" not in spec


def test_secret_values_are_referenced_never_inlined() -> None:
    pod = build(volume_settings())
    text = json.dumps(pod)
    for value in (SECRETS.encryption_password, SECRETS.access_key_id, SECRETS.secret_access_key):
        assert value is not None and value not in text
    references = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in pod["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert references == {
        name: {"name": f"zerofs-config-{VOLUME}", "key": name}
        for name in (
            "ZEROFS_CSI_ENCRYPTION_PASSWORD",
            "ZEROFS_CSI_AWS_ACCESS_KEY_ID",
            "ZEROFS_CSI_AWS_SECRET_ACCESS_KEY",
        )
    }


def test_config_secret_holds_the_config_and_the_placeholder_values() -> None:
    rendered = render_zerofs_config(
        volume_settings(),
        VOLUME,
        SECRETS,
        cache_dir=objects.CACHE_DIR,
        nbd_socket=str(SOCKETS.nbd),
        ninep_socket=str(SOCKETS.ninep),
    )
    secret = objects.config_secret(
        volume_id=VOLUME, namespace="zerofs", rendered=rendered, owner=OWNER
    )
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data[objects.CONFIG_KEY] == rendered.toml_text
    assert "${ZEROFS_CSI_ENCRYPTION_PASSWORD}" in data[objects.CONFIG_KEY]
    assert data["ZEROFS_CSI_ENCRYPTION_PASSWORD"] == SECRETS.encryption_password
    assert secret["metadata"]["labels"][objects.LABEL_VOLUME] == VOLUME
    assert secret["metadata"]["ownerReferences"] == [OWNER]


def test_config_hash_follows_what_defines_the_server() -> None:
    def digest(pod: dict[str, Any]) -> str:
        return str(pod["metadata"]["annotations"][objects.ANNOTATION_CONFIG_HASH])

    base = digest(build(volume_settings()))
    assert digest(build(volume_settings())) == base
    assert digest(build(volume_settings(cacheDiskSizeGb="2"))) != base  # config and pod
    assert digest(build(volume_settings(rustLog="debug"))) != base  # pod only
    assert digest(build(volume_settings(compression="lz4"))) != base  # config only
    assert digest(build(volume_settings(), secret_version="uid-1/18")) != base  # secrets
    # A ReadOnlyMany volume's reader is another server than its writer.
    reader = build(dataclasses.replace(volume_settings(), read_only_server=True))
    assert reader["spec"]["containers"][0]["args"][-1] == "--read-only"
    assert "--read-only" not in build(volume_settings())["spec"]["containers"][0]["args"]
    assert digest(reader) != base


def test_file_storage_is_mounted_from_the_host_at_its_own_path() -> None:
    pod = build(volume_settings(storageUrl="file:///srv/zerofs-objects", s3Endpoint=""))
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["storage"]["hostPath"] == {"path": "/srv/zerofs-objects", "type": "Directory"}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["storage"] == "/srv/zerofs-objects"
    assert "storage" not in {v["name"] for v in build(volume_settings())["spec"]["volumes"]}


def test_envoy_profile_is_a_native_sidecar() -> None:
    pod = build(volume_settings(envoyEnabled="true", envoyConfigMapName="envoy-s3"))
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == VolumeSettings.__dataclass_fields__["envoy_image"].default
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["envoy-config"] == {"name": "envoy-config", "configMap": {"name": "envoy-s3"}}


def test_server_labels_do_not_match_the_node_daemonset() -> None:
    labels = build(volume_settings())["metadata"]["labels"]
    assert not objects.selector_matches({"matchLabels": DAEMONSET_LABELS}, labels)


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ({}, True),
        ({"matchLabels": {"a": "1"}}, True),
        ({"matchLabels": {"a": "2"}}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "3"]}]}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, False),
        ({"matchExpressions": [{"key": "z", "operator": "NotIn", "values": ["1"]}]}, True),
        ({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "b", "operator": "DoesNotExist"}]}, False),
        ({"matchExpressions": [{"key": "z", "operator": "Exists"}]}, False),
    ],
)
def test_selector_matching(selector: dict[str, Any], matches: bool) -> None:
    assert objects.selector_matches(selector, {"a": "1", "b": "x"}) is matches


def test_long_node_names_are_not_labels() -> None:
    long_name = "node-" + "x" * 70 + ".example.com"
    assert objects.LABEL_NODE not in objects.volume_labels(VOLUME, long_name)
    assert objects.volume_labels(VOLUME, "node-a")[objects.LABEL_NODE] == "node-a"


# ---------------------------------------------------------------- readiness probe


def _probe(sockets: ServerSockets) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        objects.readiness_command(sockets), capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def served_volume() -> Iterator[ServerSockets]:
    """The ZeroFS stand-in (nbdkit and diod) serving a scratch volume."""
    for program in ("perl", "nbdkit", "diod"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (tools/host-packages.txt)")
    work = Path(tempfile.mkdtemp(prefix="zp-"))
    sockets = ServerSockets.under(work / "s", "vol")
    sockets.directory.mkdir(parents=True)
    config = {
        "cache": {"dir": str(work / "cache"), "disk_size_gb": 1.0},
        "storage": {"url": f"file://{work}/data", "encryption_password": "${PASSWORD}"},
        "servers": {
            "nbd": {"unix_socket": str(sockets.nbd)},
            "ninep": {"unix_socket": str(sockets.ninep)},
        },
    }
    (work / "config.toml").write_text(tomli_w.dumps(config))
    server = subprocess.Popen(
        [sys.executable, str(STANDIN), "run", "-c", str(work / "config.toml")],
        env={**os.environ, "PASSWORD": "not-a-real-one"},
    )
    try:
        deadline = time.monotonic() + 20
        while not (sockets.nbd.is_socket() and sockets.ninep.is_socket()):
            assert server.poll() is None, "the ZeroFS stand-in exited"
            assert time.monotonic() < deadline, "the ZeroFS stand-in did not start"
            time.sleep(0.05)
        yield sockets
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


def test_readiness_probe_passes_when_both_servers_answer(served_volume: ServerSockets) -> None:
    result = _probe(served_volume)
    assert result.returncode == 0, result.stderr
    # Probing again works: the first probe ended its sessions cleanly.
    assert _probe(served_volume).returncode == 0


def test_readiness_probe_fails_on_a_socket_nobody_serves(served_volume: ServerSockets) -> None:
    stale_dir = Path(tempfile.mkdtemp(prefix="zs-"))
    try:
        stale = stale_dir / "9p.sock"
        # A socket file whose server is gone, as after a crash.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(stale))
        listener.close()
        result = _probe(ServerSockets(served_volume.directory, served_volume.nbd, stale))
        assert result.returncode != 0
        assert "9P socket" in result.stderr
        # A 9P socket in the NBD place: no NBD greeting.
        swapped = ServerSockets(served_volume.directory, served_volume.ninep, served_volume.nbd)
        result = _probe(swapped)
        assert result.returncode != 0 and "NBD server: no answer in time" in result.stderr
        missing = ServerSockets(served_volume.directory, stale_dir / "none.sock", stale)
        assert _probe(missing).returncode != 0
    finally:
        shutil.rmtree(stale_dir, ignore_errors=True)


# Native sidecars (init containers with restartPolicy Always) need Kubernetes 1.29.
SCHEMA_VERSIONS = ("1.29.0", "1.33.0")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    validation = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is not installed"
    )
    rendered = render_zerofs_config(
        volume_settings(),
        VOLUME,
        SECRETS,
        cache_dir=objects.CACHE_DIR,
        nbd_socket=str(SOCKETS.nbd),
        ninep_socket=str(SOCKETS.ninep),
    )
    manifests = [
        build(volume_settings()),
        build(volume_settings(envoyEnabled="true", cpuRequest="250m", memoryLimit="2Gi")),
        build(volume_settings(storageUrl="file:///srv/zerofs-objects", s3Endpoint="")),
        objects.config_secret(volume_id=VOLUME, namespace="zerofs", rendered=rendered, owner=OWNER),
    ]
    for manifest in manifests:
        validation.validate(manifest, version, strict=True)
    misspelled = build(volume_settings())
    misspelled["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(validation.ValidationError):
        validation.validate(misspelled, version, strict=True)
