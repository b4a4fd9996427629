"""Flags become a frozen Config; bad values are one clear line and exit status 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from zerofs_csi.cli import parse_config
from zerofs_csi.config import Endpoint, LogFormat, Role


@pytest.mark.parametrize(
    ("text", "scheme", "address"),
    [
        ("unix:///tmp/csi.sock", "unix", "/tmp/csi.sock"),
        ("unix:/csi/csi.sock", "unix", "/csi/csi.sock"),
        ("tcp://127.0.0.1:10000", "tcp", "127.0.0.1:10000"),
        ("tcp://[::1]:10000", "tcp", "[::1]:10000"),
    ],
)
def test_endpoint_parse(text: str, scheme: str, address: str) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.scheme, endpoint.address) == (scheme, address)


@pytest.mark.parametrize(
    "text", ["/tmp/csi.sock", "unix://relative.sock", "tcp://host", "tcp://h:0", "tcp://:99999"]
)
def test_endpoint_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_defaults_and_frozen() -> None:
    config = parse_config(["--node-id", "node-a", "--endpoint", "unix:///tmp/x.sock"])
    assert config.role is Role.ALL
    assert config.driver_name == "zerofs.csi.driver"
    assert config.metrics_address == ":8080"
    assert config.log_format is LogFormat.JSON
    assert config.node_id == "node-a"
    assert config.state_dir == Path("/var/lib/zerofs-csi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node_id = "other"  # type: ignore[misc]


def test_controller_role_needs_no_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_ID", raising=False)
    monkeypatch.delenv("KUBE_NODE_NAME", raising=False)
    config = parse_config(["--role", "controller"])
    assert config.role is Role.CONTROLLER and config.node_id == ""


def test_node_role_without_node_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "zerofs_csi", "--role", "node"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--node-id" in result.stderr


def test_help_describes_the_roles() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zerofs_csi", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--endpoint", "--node-id", "--role", "--driver-name", "--metrics-address"):
        assert flag in result.stdout
