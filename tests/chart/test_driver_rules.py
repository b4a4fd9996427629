"""The chart refuses what the driver refuses, in the driver's words.

Every value below goes through the driver's own check (its StorageClass parameter
parser, its mount option parser, its start-up checks) and through ``helm template``;
the two must agree on accepting it, and when they refuse, the chart's error must carry
the driver's words. A rule changed on one side only fails here. Where a JSON schema
pattern mirrors a driver regex, the pattern must be that regex.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart.conftest import CHART, Helm
from zerofs_csi import errors
from zerofs_csi.cli import DRIVER_NAME_RE
from zerofs_csi.config import socket_root_of
from zerofs_csi.host import mount_options
from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.volume.id import MAX_VOLUME_ID_LENGTH
from zerofs_csi.volume.settings import parse_volume_settings
from zerofs_csi.volume.storage_url import BUCKET, KEY_SEGMENT
from zerofs_csi.volume.values import ENDPOINT, REGION

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
HELPERS = (CHART / "templates" / "_helpers.tpl").read_text()
STORAGE_CLASS = SCHEMA["properties"]["storageClasses"]["items"]["properties"]
BASE_CLASS = {"name": "zerofs", "storageUrl": "s3://bucket/volumes"}

STORAGE_URLS = [
    "s3://bucket",
    "s3://bucket/",
    "s3://my-bucket.example/volumes/team-a",
    "s3a://bucket/a.b/c_d/e-f",
    "s3://bucket/.../x",  # three dots are a name, not a step up
    "s3://bucket/.hidden/x",
    "s3://bucket/" + "p" * 512,
    "s3://bucket/" + "p" * 513,
    "s3://bucket/../x",
    "s3://bucket/a/./b",
    "s3://bucket/a/..",
    "s3://bucket/a//b",
    "s3://bucket/a/*",
    "s3://bucket/a?x=1",
    "s3://bucket/${HOME}",
    "s3://a..b/x",
    "s3://ab/x",
    "s3://Bucket/x",
    "s3://-bucket/x",
    "s3://bucket-/x",
    "s3://" + "b" * 63 + "/x",
    "s3://" + "b" * 64 + "/x",
    "s3://user@bucket/x",
    "s3://bucket:80/x",
    "https://bucket/x",
    "bucket/x",
    "s3:/bucket/x",
]

ENDPOINTS = [
    "https://s3.example.com",
    "https://s3.example.com/",
    "https://s3.example.com:9000",
    "http://10.0.0.1:7480",
    "https://[2001:db8::1]:443",
    "https://[::1]",
    "https://minio",
    "https://h:99999",
    "https://h:65535",
    "https://h:65536",
    "https://h:0",
    "https://h:",
    "https://[",
    "https://]",
    "https://-h",
    "https://h-",
    "https://h_x",
    "https://user@h",
    "https://h/path",
    "https://h?x=1",
    "https://h#x",
    "ftp://h",
    "h:9000",
    "https://",
    "https://${EVIL}",
]

MOUNT_OPTIONS = [
    ["noatime"],
    ["noatime", "nodev,nosuid"],
    ["discard", "commit=30"],
    *[[word] for word in sorted(mount_options.FORBIDDEN_OPTIONS)],
    ["noatime,bind"],
    ["ro", " remount "],
]


def socket_path_problem(state_dir: str) -> str | None:
    """Why the node plugin could not make the sockets of a volume with the longest id
    under ``state_dir``, or None."""
    try:
        ServerSockets.under(socket_root_of(Path(state_dir)), "v" * MAX_VOLUME_ID_LENGTH)
    except ValueError as exc:
        return str(exc)
    return None


def driver_words(parameters: dict[str, str]) -> str | None:
    """What the driver expects, when it refuses these StorageClass parameters."""
    try:
        parse_volume_settings(parameters)
    except errors.InvalidArgument as exc:
        match = re.search(r"expected (.*?)(?:; got .*)?$", exc.message)
        assert match is not None, exc.message
        return match[1]
    return None


def render(helm: Helm, tmp_path: Path, values: dict[str, Any]) -> tuple[bool, str]:
    values = {"secret": {"encryptionPassword": "x"}, **values}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm.template(CHART, str(path))
    return result.returncode == 0, result.stderr


def agree(helm: Helm, tmp_path: Path, storage_class: dict[str, Any], words: str | None) -> None:
    accepted, stderr = render(helm, tmp_path, {"storageClasses": [storage_class]})
    if words is None:
        assert accepted, stderr
    else:
        assert not accepted
        assert words in stderr, stderr


@pytest.mark.parametrize("url", STORAGE_URLS)
def test_storage_url(helm: Helm, tmp_path: Path, url: str) -> None:
    words = driver_words({"storageUrl": url})
    agree(helm, tmp_path, {**BASE_CLASS, "storageUrl": url}, words)


@pytest.mark.parametrize("url", ["file:///srv/zerofs", "memory://"])
def test_the_charts_storage_classes_are_for_object_stores(
    helm: Helm, tmp_path: Path, url: str
) -> None:
    # The driver takes these from the local backend (and memory:// from tests only);
    # a StorageClass in a cluster has neither.
    accepted, stderr = render(
        helm, tmp_path, {"storageClasses": [{**BASE_CLASS, "storageUrl": url}]}
    )
    assert not accepted
    assert "s3://" in stderr


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_s3_endpoint(helm: Helm, tmp_path: Path, endpoint: str) -> None:
    words = driver_words(
        {"storageUrl": "s3://bucket", "s3Endpoint": endpoint, "s3AllowHttp": "true"}
    )
    agree(helm, tmp_path, {**BASE_CLASS, "s3Endpoint": endpoint, "s3AllowHttp": True}, words)


@pytest.mark.parametrize("options", MOUNT_OPTIONS, ids=",".join)
def test_mount_options(helm: Helm, tmp_path: Path, options: list[str]) -> None:
    try:
        mount_options.MountOptions.parse(options)
        words = None
    except ValueError as exc:
        words = str(exc)
    agree(helm, tmp_path, {**BASE_CLASS, "mountOptions": options}, words)


# ---------------------------------------------------------------- the node plugin


@pytest.mark.parametrize(
    ("ports", "clash"),
    [
        ({"metricsPort": 9100, "healthPort": 9100}, "node.metricsPort and node.healthPort"),
        (
            {"metricsPort": 9100, "registrarHealthPort": 9100},
            "node.metricsPort and node.registrarHealthPort",
        ),
        (
            {"healthPort": 9809, "registrarHealthPort": 9809},
            "node.healthPort and node.registrarHealthPort",
        ),
    ],
)
def test_node_ports_must_differ(
    helm: Helm, tmp_path: Path, ports: dict[str, int], clash: str
) -> None:
    accepted, stderr = render(helm, tmp_path, {"node": ports})
    assert not accepted
    # The words the plugin or a sidecar would fail with when the second one binds.
    assert clash in stderr and "Address already in use" in stderr


def test_controller_ports_must_differ(helm: Helm, tmp_path: Path) -> None:
    accepted, stderr = render(helm, tmp_path, {"controller": {"metricsPort": 9, "healthPort": 9}})
    assert not accepted
    assert "controller.metricsPort and controller.healthPort" in stderr
    assert "Address already in use" in stderr


def test_the_longest_state_dir_is_the_drivers(helm: Helm, tmp_path: Path) -> None:
    longest = "/" + "s" * 80
    while socket_path_problem(longest) is not None:
        longest = longest[:-1]
    accepted, stderr = render(helm, tmp_path, {"node": {"stateDir": longest}})
    assert accepted, stderr
    too_long = longest + "s"
    problem = socket_path_problem(too_long)
    assert problem is not None
    accepted, stderr = render(helm, tmp_path, {"node": {"stateDir": too_long}})
    assert not accepted
    assert "is longer than the 107 bytes a unix socket address holds" in problem
    assert "is longer than the 107 bytes a unix socket address holds" in stderr


# ---------------------------------------------------------------- schema patterns


def test_schema_patterns_are_the_drivers_regexes() -> None:
    assert SCHEMA["properties"]["driverName"]["pattern"] == f"^{DRIVER_NAME_RE.pattern}$"
    # Empty leaves the region unset.
    assert STORAGE_CLASS["s3Region"]["pattern"] == f"^({REGION.pattern})?$"


def test_the_templates_check_with_the_drivers_regexes() -> None:
    for regex in (BUCKET, KEY_SEGMENT, ENDPOINT):
        assert f"`^{regex.pattern}$`" in HELPERS, regex.pattern
    forbidden = re.search(r"has \$word \(list ([^)]*)\)", HELPERS)
    assert forbidden is not None
    assert set(re.findall(r'"([^"]+)"', forbidden[1])) == mount_options.FORBIDDEN_OPTIONS
