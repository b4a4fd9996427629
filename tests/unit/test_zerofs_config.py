"""ZeroFS TOML rendering: typed values, accepted keys only, secrets as placeholders."""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from typing import Any

import pytest

from zerofs_csi import errors
from zerofs_csi.servers.zerofs_config import (
    ACCEPTED_KEYS,
    AWS_KEYS,
    ENV_ACCESS_KEY_ID,
    ENV_CONDITIONAL_PUT,
    ENV_ENCRYPTION_PASSWORD,
    ENV_SECRET_ACCESS_KEY,
    ENV_SESSION_TOKEN,
    UNIX_SOCKET_PATH_MAX,
    check_accepted_keys,
    render_zerofs_config,
)
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import DEFAULT_ZEROFS_IMAGE, VolumeSettings, parse_volume_settings
from zerofs_csi.volume.storage_url import StorageUrl
from zerofs_csi.volume.zerofs_version import (
    SUPPORTED_ZEROFS_VERSIONS,
    image_zerofs_version,
    zerofs_version_supported,
)

SOCKETS = {
    "cache_dir": "/var/lib/zerofs-csi/cache/pvc-1",
    "nbd_socket": "/run/zerofs-csi/pvc-1.nbd.sock",
    "ninep_socket": "/run/zerofs-csi/pvc-1.9p.sock",
}
PASSWORD_ONLY = VolumeSecrets(encryption_password="p4ss")
ALL_SECRETS = VolumeSecrets(
    encryption_password='pa$$word "quoted"\n[storage]\nurl = "s3://evil"',
    access_key_id="AKIAEXAMPLE",
    secret_access_key="secret/with$dollar",
    session_token="token-value",
    conditional_put_url="redis://:redispw@redis:6379",
)
# Keys that some ZeroFS release knew but the supported range rejects.
FORBIDDEN_KEYS = {"max_unflushed_gb", "wal_enabled", "wal", "default_region_name"}


def render(settings: VolumeSettings, secrets: VolumeSecrets = PASSWORD_ONLY, **kwargs: Any):
    arguments: dict[str, Any] = {**SOCKETS, **kwargs}
    return render_zerofs_config(settings, "pvc-1", secrets, **arguments)


def settings_from(parameters: dict[str, str]) -> VolumeSettings:
    return parse_volume_settings({"storageUrl": "s3://bucket/base", **parameters})


def all_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= all_keys(value, f"{prefix}{key}.")
    return keys


def lookup(document: dict[str, Any], path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize(
    ("parameters", "path", "expected"),
    [
        ({}, "storage.url", "s3://bucket/base/pvc-1"),
        ({"storageUrl": "s3://bucket"}, "storage.url", "s3://bucket/pvc-1"),
        ({"storageUrl": "s3a://bucket/x/y/"}, "storage.url", "s3a://bucket/x/y/pvc-1"),
        ({"cacheDiskSizeGb": "20"}, "cache.disk_size_gb", 20.0),
        ({"cacheDiskSizeGb": "0.5"}, "cache.disk_size_gb", 0.5),
        ({"cacheMemorySizeGb": "2"}, "cache.memory_size_gb", 2.0),
        ({}, "cache.dir", SOCKETS["cache_dir"]),
        ({}, "servers.nbd.unix_socket", SOCKETS["nbd_socket"]),
        ({}, "servers.ninep.unix_socket", SOCKETS["ninep_socket"]),
        ({"compression": "lz4"}, "filesystem.compression", "lz4"),
        ({"compression": "zstd-7"}, "filesystem.compression", "zstd-7"),
        ({"l0MaxSsts": "64"}, "lsm.l0_max_ssts", 64),
        ({"maxConcurrentCompactions": "3"}, "lsm.max_concurrent_compactions", 3),
        ({"flushIntervalSecs": "15"}, "lsm.flush_interval_secs", 15),
        ({"syncWrites": "true"}, "lsm.sync_writes", True),
        ({}, "telemetry.enabled", False),
        ({"telemetryEnabled": "true"}, "telemetry.enabled", True),
        ({"s3Endpoint": "https://s3.local:9000"}, "aws.endpoint", "https://s3.local:9000"),
        ({"s3Region": "eu-west-3"}, "aws.region", "eu-west-3"),
        ({}, "aws.allow_http", "false"),
        ({"s3Endpoint": "http://minio:9000", "s3AllowHttp": "true"}, "aws.allow_http", "true"),
        (
            {"conditionalPutRedisUrl": "redis://redis:6379/1"},
            "aws.conditional_put",
            "redis://redis:6379/1",
        ),
        ({}, "storage.encryption_password", "${" + ENV_ENCRYPTION_PASSWORD + "}"),
    ],
)
def test_each_setting_lands_at_its_key(
    parameters: dict[str, str], path: str, expected: Any
) -> None:
    rendered = render(settings_from(parameters))
    document = tomllib.loads(rendered.toml_text)
    value = lookup(document, path)
    assert value == expected
    assert type(value) is type(expected)


def test_unset_optional_tables_are_left_out() -> None:
    document = tomllib.loads(render(settings_from({})).toml_text)
    assert set(document) == {"cache", "storage", "servers", "telemetry", "aws"}
    assert set(document["servers"]) == {"nbd", "ninep"}
    assert "addresses" not in document["servers"]["nbd"]  # no TCP listener


def test_rpc_socket_when_given() -> None:
    rendered = render(settings_from({}), rpc_socket="/run/zerofs-csi/pvc-1.rpc.sock")
    document = tomllib.loads(rendered.toml_text)
    assert document["servers"]["rpc"] == {"unix_socket": "/run/zerofs-csi/pvc-1.rpc.sock"}


def test_memory_store_has_no_aws_table() -> None:
    settings = parse_volume_settings({"storageUrl": "memory://"}, allow_memory_store=True)
    document = tomllib.loads(render(settings, ALL_SECRETS).toml_text)
    assert document["storage"]["url"] == "memory:///pvc-1"
    assert "aws" not in document


def test_credentials_are_placeholders_filled_from_secret_env() -> None:
    rendered = render(settings_from({"conditionalPutRedisUrl": "redis://other:6379"}), ALL_SECRETS)
    document = tomllib.loads(rendered.toml_text)
    assert document["aws"]["access_key_id"] == "${" + ENV_ACCESS_KEY_ID + "}"
    assert document["aws"]["secret_access_key"] == "${" + ENV_SECRET_ACCESS_KEY + "}"
    assert document["aws"]["session_token"] == "${" + ENV_SESSION_TOKEN + "}"
    # The secret's Redis URL (it may hold a password) wins over the parameter.
    assert document["aws"]["conditional_put"] == "${" + ENV_CONDITIONAL_PUT + "}"
    assert rendered.secret_env == {
        ENV_ENCRYPTION_PASSWORD: ALL_SECRETS.encryption_password,
        ENV_ACCESS_KEY_ID: ALL_SECRETS.access_key_id,
        ENV_SECRET_ACCESS_KEY: ALL_SECRETS.secret_access_key,
        ENV_SESSION_TOKEN: ALL_SECRETS.session_token,
        ENV_CONDITIONAL_PUT: ALL_SECRETS.conditional_put_url,
    }
    placeholders = set(re.findall(r"\$\{([A-Z0-9_]+)\}", rendered.toml_text))
    assert placeholders == set(rendered.secret_env)


def test_without_credentials_no_aws_credential_keys() -> None:
    rendered = render(settings_from({}), PASSWORD_ONLY)
    aws = tomllib.loads(rendered.toml_text)["aws"]
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(aws)
    assert set(rendered.secret_env) == {ENV_ENCRYPTION_PASSWORD}


def test_secret_values_never_reach_the_toml_or_the_repr() -> None:
    rendered = render(settings_from({}), ALL_SECRETS)
    secret_values = [
        v for f in dataclasses.fields(ALL_SECRETS) if (v := getattr(ALL_SECRETS, f.name))
    ]
    for value in secret_values:
        assert value not in rendered.toml_text
        assert value not in repr(rendered)
        assert value not in str(rendered)
    assert ENV_SECRET_ACCESS_KEY in repr(rendered)


# Settings built directly (as a caller bypassing parsing could) with hostile strings.
INJECTIONS = [
    '"]\n[storage]\nurl = "s3://evil"',
    "]\n[storage]",
    'x" \nencryption_password = "known',
    "a'b\"c\\d",
    "\\u0022",
    "x]]\n[[servers.nfs]]",
    "tab\there",
    "\u2028line separator",
]
INJECTABLE_FIELDS = ["compression", "s3_region", "s3_endpoint", "conditional_put_redis_url"]


@pytest.mark.parametrize(
    ("attr", "payload"), list(itertools.product(INJECTABLE_FIELDS, INJECTIONS))
)
def test_injection_ends_as_a_plain_string_or_is_refused(attr: str, payload: str) -> None:
    settings = dataclasses.replace(settings_from({}), **{attr: payload})
    try:
        rendered = render(settings)
    except errors.InvalidArgument as exc:
        # Refused values are the control characters in keys ZeroFS expands.
        assert attr != "compression"
        assert "control characters" in exc.message
        return
    document = tomllib.loads(rendered.toml_text)
    where = {
        "compression": "filesystem.compression",
        "s3_region": "aws.region",
        "s3_endpoint": "aws.endpoint",
        "conditional_put_redis_url": "aws.conditional_put",
    }[attr]
    assert lookup(document, where) == payload
    assert document["storage"]["url"] == "s3://bucket/base/pvc-1"
    assert document["storage"]["encryption_password"] == "${" + ENV_ENCRYPTION_PASSWORD + "}"
    assert set(document) <= {"cache", "storage", "servers", "filesystem", "telemetry", "aws"}
    assert set(document["servers"]) == {"nbd", "ninep"}


@pytest.mark.parametrize("attr", ["s3_region", "s3_endpoint", "conditional_put_redis_url"])
def test_dollar_in_an_expanded_literal_is_refused(attr: str) -> None:
    settings = dataclasses.replace(settings_from({}), **{attr: "x${AWS_SECRET_ACCESS_KEY}"})
    with pytest.raises(errors.InvalidArgument, match="must not contain '\\$'"):
        render(settings)


def test_hostile_storage_path_built_directly_is_still_a_plain_string() -> None:
    settings = dataclasses.replace(
        settings_from({}), storage_url=StorageUrl("s3", "bucket", 'a"\n[aws]\nendpoint = "x')
    )
    with pytest.raises(errors.InvalidArgument, match="control characters"):
        render(settings)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"nbd_socket": "relative.sock"}, "absolute"),
        ({"ninep_socket": "/run/" + "x" * UNIX_SOCKET_PATH_MAX}, "unix socket path"),
        ({"nbd_socket": "/run/$HOME/nbd.sock"}, "'$'"),
        ({"cache_dir": "cache"}, "absolute"),
        ({"cache_dir": "/cache/${X}"}, "'$'"),
        ({"ninep_socket": SOCKETS["nbd_socket"]}, "distinct"),
        ({"rpc_socket": "/run/a\nb"}, "control characters"),
    ],
)
def test_bad_paths_are_refused(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        render(settings_from({}), **kwargs)
    assert fragment in info.value.message


def test_unsafe_volume_id_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="volume id"):
        render_zerofs_config(settings_from({}), "../pvc-1", PASSWORD_ONLY, **SOCKETS)


def test_non_positive_cache_size_built_directly_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="cacheDiskSizeGb"):
        render(dataclasses.replace(settings_from({}), cache_disk_size_gb=0.0))


# Every combination of optional settings; each rendering must stay inside the schema.
OPTIONAL = [
    {"compression": "zstd-3"},
    {"l0MaxSsts": "256", "maxConcurrentCompactions": "2", "flushIntervalSecs": "30"},
    {"s3Endpoint": "http://minio:9000", "s3AllowHttp": "true", "s3Region": "us-east-1"},
    {"conditionalPutRedisUrl": "redis://redis:6379"},
    {"telemetryEnabled": "true"},
]


@pytest.mark.parametrize("mask", range(2 ** len(OPTIONAL)))
@pytest.mark.parametrize("secrets", [PASSWORD_ONLY, ALL_SECRETS], ids=["password", "all"])
def test_only_accepted_keys_are_ever_emitted(mask: int, secrets: VolumeSecrets) -> None:
    parameters: dict[str, str] = {}
    for bit, extra in enumerate(OPTIONAL):
        if mask & (1 << bit):
            parameters |= extra
    rendered = render(settings_from(parameters), secrets, rpc_socket="/run/zerofs-csi/r.sock")
    document = tomllib.loads(rendered.toml_text)
    for required in ("cache", "storage", "servers"):
        assert required in document
    assert {"dir", "disk_size_gb"} <= set(document["cache"])
    keys = all_keys(document)
    assert not {key.rsplit(".", 1)[-1] for key in keys} & FORBIDDEN_KEYS
    for key in keys:
        table, _, name = key.rpartition(".")
        accepted = AWS_KEYS if table == "aws" else ACCEPTED_KEYS[table]
        assert name in accepted, key
    assert all(isinstance(value, str) for value in document["aws"].values())


@pytest.mark.parametrize(
    "document",
    [
        {"lsm": {"max_unflushed_gb": 1.0}},
        {"wal": {"enabled": True}},
        {"cache": {"dir": "/c", "disk_size_gb": 1.0, "size": 1}},
        {"aws": {"allow_http": True}},
        {"aws": {"default_region_name": "x"}},
        {"servers": {"nbd": {"unix_socket": "/s", "port": 1}}},
    ],
)
def test_schema_check_rejects_what_zerofs_would_reject(document: dict[str, Any]) -> None:
    with pytest.raises(errors.Internal):
        check_accepted_keys(document)


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("ghcr.io/barre/zerofs:2.3.0", (2, 3, 0)),
        ("ghcr.io/barre/zerofs:2.3", (2, 3, 0)),
        ("ghcr.io/barre/zerofs:v2.10.4", (2, 10, 4)),
        ("ghcr.io/barre/zerofs:0.16.2", (0, 16, 2)),
        ("ghcr.io/barre/zerofs:latest", None),
        ("ghcr.io/barre/zerofs", None),
        ("registry.local:5000/zerofs:2.3.0", None),
        ("ghcr.io/barre/zerofs@sha256:" + "0" * 64, None),
    ],
)
def test_image_versions(image: str, version: tuple[int, int, int] | None) -> None:
    assert image_zerofs_version(image) == version


def test_supported_range() -> None:
    assert SUPPORTED_ZEROFS_VERSIONS == ">=2.3.0,<3.0.0"
    assert zerofs_version_supported((2, 3, 0))
    assert zerofs_version_supported((2, 99, 0))
    assert not zerofs_version_supported((2, 2, 3))
    assert not zerofs_version_supported((3, 0, 0))
    default = image_zerofs_version(DEFAULT_ZEROFS_IMAGE)
    assert default is not None and zerofs_version_supported(default)
