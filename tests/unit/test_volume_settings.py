"""Settings parsing: strict keys and types, ConfigMap precedence, volume ids, secrets."""

from __future__ import annotations

import dataclasses
import logging
from decimal import Decimal

import grpc
import pytest

from zerofs_csi import errors
from zerofs_csi.volume.id import MAX_VOLUME_ID_LENGTH, validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import (
    CONFIG_MAP_KEYS,
    DEFAULT_ZEROFS_IMAGE,
    IGNORED_LEGACY_KEYS,
    PARAMETER_KEYS,
    VolumeSettings,
    config_map_name,
    parse_volume_settings,
)
from zerofs_csi.volume.storage_url import StorageUrl
from zerofs_csi.volume.values import quantity_value

BASE = {"storageUrl": "s3://bucket/zerofs"}


def parse(extra: dict[str, str], config_map: dict[str, str] | None = None) -> VolumeSettings:
    parameters = {**BASE, **extra}
    if config_map is not None:
        parameters.setdefault("configMapName", "zerofs-config")
    return parse_volume_settings(parameters, config_map)


# --------------------------------------------------------------------------- volume ids


@pytest.mark.parametrize(
    "volume_id",
    [
        "a",
        "pvc-1",
        "pvc-10",
        "pvc-2f0c3a9e-6d0a-4f43-9a53-0d6c3b6f1e2a",
        "x" * MAX_VOLUME_ID_LENGTH,
    ],
)
def test_valid_volume_ids(volume_id: str) -> None:
    assert validate_volume_id(volume_id) == volume_id


@pytest.mark.parametrize(
    "volume_id",
    [
        "",
        "..",
        "../x",
        "a/b",
        "/abs",
        "Pvc-1",
        "-pvc",
        "pvc-",
        "pvc_1",
        "pvc.1",
        "pvc 1",
        "pvc-1\n",
        "pvc*",
        "pvcé",
        "x" * (MAX_VOLUME_ID_LENGTH + 1),
    ],
)
def test_invalid_volume_ids(volume_id: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        validate_volume_id(volume_id)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "volume id" in info.value.message


def test_volume_id_length_leaves_room_for_object_names() -> None:
    assert len("zerofs-volume-" + "x" * MAX_VOLUME_ID_LENGTH) == 63


# --------------------------------------------------------------------------- parameters


def test_defaults_with_only_the_storage_url() -> None:
    settings = parse({})
    assert settings == VolumeSettings(storage_url=StorageUrl("s3", "bucket", "zerofs"))
    assert settings.filesystem == "ext4"
    assert settings.image == DEFAULT_ZEROFS_IMAGE
    assert settings.delete_data_on_pvc_delete is False
    assert settings.s3_allow_http is False
    assert settings.telemetry_enabled is False
    assert settings.compression is None and settings.l0_max_ssts is None


@pytest.mark.parametrize(
    ("key", "raw", "attr", "expected"),
    [
        ("filesystem", "xfs", "filesystem", "xfs"),
        ("filesystem", "btrfs", "filesystem", "btrfs"),
        ("storageUrl", "s3://my-bucket/a/b/", "storage_url", StorageUrl("s3", "my-bucket", "a/b")),
        ("storageUrl", "s3a://my.bucket", "storage_url", StorageUrl("s3a", "my.bucket", "")),
        (
            "s3Endpoint",
            "https://s3.example.com:9000/",
            "s3_endpoint",
            "https://s3.example.com:9000",
        ),
        ("s3Region", "eu-west-3", "s3_region", "eu-west-3"),
        ("s3AllowHttp", "True", "s3_allow_http", True),
        ("s3AllowHttp", "false", "s3_allow_http", False),
        ("image", "ghcr.io/barre/zerofs:2.3.0", "image", "ghcr.io/barre/zerofs:2.3.0"),
        ("image", "ghcr.io/barre/zerofs:2.4", "image", "ghcr.io/barre/zerofs:2.4"),
        (
            "image",
            "registry.local:5000/zerofs:custom",
            "image",
            "registry.local:5000/zerofs:custom",
        ),
        ("image", "zerofs@sha256:" + "a" * 64, "image", "zerofs@sha256:" + "a" * 64),
        ("cacheDiskSizeGb", "20", "cache_disk_size_gb", 20.0),
        ("cacheDiskSizeGb", "0.5", "cache_disk_size_gb", 0.5),
        ("cacheMemorySizeGb", "2.25", "cache_memory_size_gb", 2.25),
        ("compression", "lz4", "compression", "lz4"),
        ("compression", "zstd-1", "compression", "zstd-1"),
        ("compression", "zstd-22", "compression", "zstd-22"),
        ("l0MaxSsts", "64", "l0_max_ssts", 64),
        ("maxConcurrentCompactions", "4", "max_concurrent_compactions", 4),
        ("flushIntervalSecs", "5", "flush_interval_secs", 5),
        ("syncWrites", "true", "sync_writes", True),
        ("rustLog", "zerofs=debug,slatedb=info", "rust_log", "zerofs=debug,slatedb=info"),
        (
            "conditionalPutRedisUrl",
            "redis://redis:6379/0",
            "conditional_put_redis_url",
            "redis://redis:6379/0",
        ),
        ("cpuRequest", "250m", "cpu_request", "250m"),
        ("cpuLimit", "2", "cpu_limit", "2"),
        ("memoryRequest", "512Mi", "memory_request", "512Mi"),
        ("memoryLimit", "1.5Gi", "memory_limit", "1.5Gi"),
        ("podReadyTimeoutSeconds", "300", "pod_ready_timeout_seconds", 300),
        ("nbdConnections", "1", "nbd_connections", 1),
        ("nbdConnections", "16", "nbd_connections", 16),
        ("deleteDataOnPVCDelete", "true", "delete_data_on_pvc_delete", True),
        ("envoyEnabled", "true", "envoy_enabled", True),
        ("envoyImage", "envoyproxy/envoy:v1.35.0", "envoy_image", "envoyproxy/envoy:v1.35.0"),
        ("envoyConfigMapName", "my-envoy", "envoy_config_map_name", "my-envoy"),
        ("telemetryEnabled", "true", "telemetry_enabled", True),
    ],
)
def test_each_parameter_parses(key: str, raw: str, attr: str, expected: object) -> None:
    settings = parse({key: raw})
    assert getattr(settings, attr) == expected
    # And the volume context form gives the same settings back.
    assert parse_volume_settings(settings.to_parameters()) == settings


def test_every_parameter_is_covered_by_the_table() -> None:
    keys = {
        "filesystem", "storageUrl", "s3Endpoint", "s3Region", "s3AllowHttp", "image",
        "cacheDiskSizeGb", "cacheMemorySizeGb", "compression", "l0MaxSsts",
        "maxConcurrentCompactions", "flushIntervalSecs", "rustLog", "conditionalPutRedisUrl",
        "cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit", "podReadyTimeoutSeconds",
        "deleteDataOnPVCDelete", "envoyEnabled", "envoyImage", "envoyConfigMapName",
        "telemetryEnabled", "configMapName", "nbdConnections", "syncWrites",
    }  # fmt: skip
    assert set(PARAMETER_KEYS) == keys


def test_reserved_csi_keys_are_ignored() -> None:
    settings = parse(
        {
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "default",
            "csi.storage.k8s.io/node-stage-secret-name": "zerofs",
            "storage.kubernetes.io/csiProvisionerIdentity": "123-zerofs.csi.driver",
        }
    )
    assert settings == parse({})


def test_empty_values_count_as_unset() -> None:
    assert parse({"filesystem": "", "s3Region": "  ", "compression": ""}) == parse({})


def test_unknown_parameter_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse({"cacheSize": "10"})
    message = info.value.message
    assert "'cacheSize'" in message
    for known in ("storageUrl", "filesystem", "deleteDataOnPVCDelete", "configMapName"):
        assert known in message


@pytest.mark.parametrize(
    ("key", "raw", "form"),
    [
        ("filesystem", "ext3", "ext4, xfs, btrfs"),
        ("storageUrl", "http://bucket/x", "s3://"),
        ("storageUrl", "s3://Bucket/x", "bucket name"),
        ("storageUrl", "s3://ab", "bucket name"),
        ("storageUrl", "s3://bucket/a/../b", "'..'"),
        ("storageUrl", "s3://bucket/a//b", "'//'"),
        ("storageUrl", "s3://bucket/a/*", "'*'"),
        ("storageUrl", "s3://bucket/./a", "segments"),
        ("storageUrl", "s3://bucket/a?x=1", "segments"),
        ("storageUrl", "s3://user@bucket/a", "bucket name"),
        ("storageUrl", "s3://bucket/${HOME}", "segments"),
        ("storageUrl", "bucket/path", "URL"),
        ("storageUrl", "memory:///x", "memory://"),
        ("storageUrl", "file://relative/dir", "file:///absolute"),
        ("storageUrl", "file:///", "not the root"),
        ("storageUrl", "file:///srv/../etc", "'..'"),
        ("storageUrl", "file:///srv//x", "'//'"),
        ("storageUrl", "file:///srv/${HOME}", "segments"),
        ("s3Endpoint", "minio:9000", "http://"),
        ("s3Endpoint", "ftp://minio", "http://"),
        ("s3Endpoint", "https://user:pw@minio", "no path, user"),
        ("s3Endpoint", "https://minio/bucket", "no path"),
        ("s3Endpoint", "https://minio:99999", "http://"),
        ("s3Endpoint", "https://${EVIL}", "http://"),
        ("s3Endpoint", "https://s3.exa\tmple.com", "http://"),
        ("s3Endpoint", "https://s3.exa\r\nmple.com", "http://"),
        ("s3Endpoint", "https://s3 .example.com", "http://"),
        ("s3Endpoint", "https://h:0", "port"),
        ("s3Endpoint", "https://h:", "port"),
        ("s3Endpoint", "https://-h", "host"),
        ("s3Endpoint", "https://h_x", "host"),
        ("s3Endpoint", "https://[::g]", "host"),
        ("s3Region", "us east", "region"),
        ("s3AllowHttp", "yes", '"true" or "false"'),
        ("image", "Not An Image", "image reference"),
        ("image", "ghcr.io/barre/zerofs:0.16.2", ">=2.3.0,<3.0.0"),
        ("image", "ghcr.io/barre/zerofs:3.0.0", ">=2.3.0,<3.0.0"),
        ("cacheDiskSizeGb", "0", "GB"),
        ("cacheDiskSizeGb", "-1", "GB"),
        ("cacheDiskSizeGb", "1e3", "GB"),
        ("cacheDiskSizeGb", "nan", "GB"),
        ("cacheDiskSizeGb", "ten", "GB"),
        ("cacheMemorySizeGb", "inf", "GB"),
        ("compression", "zstd-23", "zstd-N"),
        ("compression", "zstd-0", "zstd-N"),
        ("compression", "gzip", "lz4"),
        ("l0MaxSsts", "3", "from 4"),
        ("l0MaxSsts", "1.5", "integer"),
        ("maxConcurrentCompactions", "0", "from 1"),
        ("flushIntervalSecs", "4", "from 5"),
        ("flushIntervalSecs", "-30", "integer"),
        ("rustLog", "info; rm -rf /", "RUST_LOG"),
        ("conditionalPutRedisUrl", "http://redis:6379", "redis://"),
        ("cpuRequest", "lots", "quantity"),
        ("cpuRequest", "1_000", "quantity"),
        ("cpuRequest", "Infinity", "quantity"),
        ("cpuRequest", "1e999999999999", "at most 9223372036854775807"),
        ("cpuRequest", "1e" + "9" * 5000, "quantity"),
        ("memoryLimit", "-1Gi", "quantity"),
        ("memoryLimit", "8Ei", "at most 9223372036854775807"),
        ("memoryLimit", "9" * 5000, "quantity"),
        ("l0MaxSsts", "9" * 5000, "from 4 to 100000"),
        ("l0MaxSsts", "1000000", "from 4 to 100000"),
        ("podReadyTimeoutSeconds", "0", "from 1"),
        ("nbdConnections", "0", "from 1"),
        ("nbdConnections", "17", "16"),
        ("nbdConnections", "four", "integer"),
        ("podReadyTimeoutSeconds", "1h", "integer"),
        ("deleteDataOnPVCDelete", "1", '"true" or "false"'),
        ("envoyConfigMapName", "Envoy_Config", "DNS-1123"),
        ("telemetryEnabled", "on", '"true" or "false"'),
    ],
)
def test_ill_typed_values_name_the_key_and_the_expected_form(key: str, raw: str, form: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse({key: raw})
    assert f"StorageClass parameter {key!r}" in info.value.message
    assert form in info.value.message


def test_storage_url_is_required() -> None:
    with pytest.raises(errors.InvalidArgument, match="'storageUrl' is required"):
        parse_volume_settings({"filesystem": "xfs"})


def test_redis_url_with_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse({"conditionalPutRedisUrl": "redis://user:hunter2@redis:6379"})
    assert "hunter2" not in info.value.message
    assert "CSI secret" in info.value.message


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"s3Endpoint": "http://minio:9000"}, "s3AllowHttp"),
        ({"storageUrl": "file:///srv", "s3Region": "x"}, "'s3Region' applies only"),
        ({"storageUrl": "file:///srv", "s3AllowHttp": "true"}, "'s3AllowHttp' applies only"),
        ({"storageUrl": "file:///srv", "deleteDataOnPVCDelete": "true"}, "deleteDataOnPVCDelete"),
        ({"storageUrl": "file:///srv", "s3Endpoint": "https://s3"}, "'s3Endpoint' applies only"),
        ({"cpuRequest": "2", "cpuLimit": "1500m"}, "'cpuRequest' (2) is greater"),
        ({"memoryRequest": "2Gi", "memoryLimit": "2G"}, "'memoryRequest' (2Gi) is greater"),
    ],
)
def test_inconsistent_settings_are_refused(extra: dict[str, str], fragment: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse(extra)
    assert fragment in info.value.message


def test_memory_store_only_when_allowed() -> None:
    with pytest.raises(errors.InvalidArgument, match="lost at every server restart"):
        parse({"storageUrl": "memory://"})
    settings = parse_volume_settings({"storageUrl": "memory://"}, allow_memory_store=True)
    assert settings.storage_url == StorageUrl("memory", "", "")


def test_plain_http_when_allowed() -> None:
    settings = parse({"s3Endpoint": "http://127.0.0.1:7480", "s3AllowHttp": "true"})
    assert settings.s3_endpoint == "http://127.0.0.1:7480"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Decimal(1)),
        ("500m", Decimal("0.5")),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("2k", Decimal(2000)),
        ("1e3", Decimal(1000)),
        ("1E", Decimal("1e18")),
        (".5", Decimal("0.5")),
        ("128974848", Decimal(128974848)),
        ("7Ei", Decimal(7 * 2**60)),
        ("1e-3", Decimal("0.001")),
    ],
)
def test_quantities(text: str, value: Decimal) -> None:
    assert quantity_value(text) == value


def test_resources_in_api_shape() -> None:
    settings = parse({"cpuRequest": "100m", "memoryRequest": "256Mi", "memoryLimit": "1Gi"})
    assert settings.resources() == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert parse({}).resources() == {}


def test_to_parameters_round_trips_a_fully_populated_settings() -> None:
    settings = parse(
        {
            "filesystem": "btrfs",
            "storageUrl": "s3://bucket/a/b",
            "s3Endpoint": "https://s3.local",
            "s3Region": "local",
            "s3AllowHttp": "true",
            "image": "ghcr.io/barre/zerofs:2.3.0",
            "cacheDiskSizeGb": "12.5",
            "cacheMemorySizeGb": "0.25",
            "compression": "zstd-9",
            "l0MaxSsts": "128",
            "maxConcurrentCompactions": "3",
            "flushIntervalSecs": "10",
            "rustLog": "debug",
            "conditionalPutRedisUrl": "rediss://redis.svc:6380",
            "cpuRequest": "1",
            "cpuLimit": "2",
            "memoryRequest": "1Gi",
            "memoryLimit": "2Gi",
            "podReadyTimeoutSeconds": "30",
            "deleteDataOnPVCDelete": "true",
            "envoyEnabled": "true",
            "envoyImage": "envoyproxy/envoy:v1.35.0",
            "envoyConfigMapName": "envoy",
            "telemetryEnabled": "true",
        }
    )
    parameters = settings.to_parameters()
    assert all(isinstance(value, str) for value in parameters.values())
    assert parse_volume_settings(parameters) == settings
    assert parse({}).to_parameters() == {"storageUrl": "s3://bucket/zerofs"}


# --------------------------------------------------------------------------- ConfigMap


GO_DRIVER_CONFIG_MAP = {
    "storageURL": "s3://zerofs",
    "awsEndpoint": "http://minio.default.svc.cluster.local:9000",
    "awsDefaultRegion": "us-east-1",
    "awsAllowHTTP": "true",
    "zerofsImage": "ghcr.io/barre/zerofs:2.3.0",
    "cacheDir": "/tmp",
    "cacheDiskSizeGB": "1.0",
    "cacheMemorySizeGB": "2.0",
    "lsmL0MaxSsts": "16",
    "lsmMaxUnflushedGB": "1.0",
    "lsmMaxConcurrentCompactions": "8",
    "lsmFlushIntervalSecs": "30",
    "filesystemMaxSizeGB": "100.0",
    "rustLog": "zerofs=debug,slatedb=debug",
    "podReadyTimeoutSeconds": "180",
    "envoyEnabled": "true",
    "envoyImage": "envoyproxy/envoy-distroless:v1.34.4",
    "envoyConfigMapRef": "envoy-s3",
    "cpuRequest": "100m",
    "cpuLimit": "1",
    "memoryRequest": "256Mi",
    "memoryLimit": "1Gi",
    "awsCredentialsSecretName": "minio-zerofs-credentials",
    "encryptionPasswordSecretName": "zerofs-encryption-password",
}


def test_go_driver_config_map_keeps_working() -> None:
    settings = parse_volume_settings(
        {"filesystem": "btrfs", "configMapName": "zerofs-btrfs-config"}, GO_DRIVER_CONFIG_MAP
    )
    assert settings.storage_url == StorageUrl("s3", "zerofs", "")
    assert settings.s3_endpoint == "http://minio.default.svc.cluster.local:9000"
    assert settings.s3_region == "us-east-1"
    assert settings.s3_allow_http is True
    assert settings.image == "ghcr.io/barre/zerofs:2.3.0"
    assert settings.cache_disk_size_gb == 1.0
    assert settings.cache_memory_size_gb == 2.0
    assert (settings.l0_max_ssts, settings.max_concurrent_compactions) == (16, 8)
    assert settings.flush_interval_secs == 30
    assert settings.rust_log == "zerofs=debug,slatedb=debug"
    assert settings.pod_ready_timeout_seconds == 180
    assert settings.envoy_enabled is True
    assert settings.envoy_config_map_name == "envoy-s3"
    assert settings.resources() == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert settings.filesystem == "btrfs"
    assert settings.ignored_legacy_keys == tuple(sorted(IGNORED_LEGACY_KEYS))


def test_go_driver_config_map_with_empty_values() -> None:
    data = {**GO_DRIVER_CONFIG_MAP, "awsDefaultRegion": "", "awsEndpoint": "", "awsAllowHTTP": ""}
    settings = parse_volume_settings({"configMapName": "legacy"}, data)
    assert (settings.s3_region, settings.s3_endpoint, settings.s3_allow_http) == (None, None, False)


@pytest.mark.parametrize(
    ("parameters", "config_map", "attr", "expected"),
    [
        # parameter beats ConfigMap
        ({"filesystem": "xfs"}, {"filesystem": "btrfs"}, "filesystem", "xfs"),
        ({"storageUrl": "s3://param/x"}, {"storageURL": "s3://cm-bucket/y"}, "storage_url",
         StorageUrl("s3", "param", "x")),
        ({"s3Region": "a"}, {"awsDefaultRegion": "b"}, "s3_region", "a"),
        ({"l0MaxSsts": "32"}, {"lsmL0MaxSsts": "64"}, "l0_max_ssts", 32),
        ({"podReadyTimeoutSeconds": "10"}, {"podReadyTimeoutSeconds": "20"},
         "pod_ready_timeout_seconds", 10),
        # ConfigMap beats default
        ({}, {"filesystem": "btrfs"}, "filesystem", "btrfs"),
        ({}, {"zerofsImage": "ghcr.io/barre/zerofs:2.3"}, "image", "ghcr.io/barre/zerofs:2.3"),
        ({}, {"cacheMemorySizeGb": "3"}, "cache_memory_size_gb", 3.0),
        # default when neither
        ({}, {}, "filesystem", "ext4"),
        ({}, {}, "pod_ready_timeout_seconds", 120),
        # an empty parameter falls through to the ConfigMap
        ({"s3Region": ""}, {"awsDefaultRegion": "b"}, "s3_region", "b"),
    ],
)  # fmt: skip
def test_precedence_parameters_then_config_map_then_defaults(
    parameters: dict[str, str], config_map: dict[str, str], attr: str, expected: object
) -> None:
    full_parameters = {"configMapName": "zerofs", **parameters}
    data = {"storageURL": "s3://cm-bucket/base", **config_map}
    assert getattr(parse_volume_settings(full_parameters, data), attr) == expected


def test_unknown_config_map_key_names_it_and_the_config_map() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse({}, {"cacheDIR": "/x"})
    assert "'cacheDIR'" in info.value.message
    assert "'zerofs-config'" in info.value.message
    assert "storageURL" in info.value.message and "cacheDir" in info.value.message


def test_ill_typed_config_map_value_names_the_config_map_key() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse({}, {"lsmFlushIntervalSecs": "soon"})
    assert "ConfigMap 'zerofs-config' key 'lsmFlushIntervalSecs'" in info.value.message
    assert "integer" in info.value.message


def test_config_map_setting_a_key_twice_differently_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="'storageUrl' twice"):
        parse_volume_settings(
            {"configMapName": "cm"}, {"storageURL": "s3://one/a", "storageUrl": "s3://two/a"}
        )
    same = parse_volume_settings(
        {"configMapName": "cm"}, {"storageURL": "s3://one/a", "storageUrl": "s3://one/a"}
    )
    assert same.storage_url == StorageUrl("s3", "one", "a")


def test_config_map_keys_cover_go_driver_keys() -> None:
    assert set(GO_DRIVER_CONFIG_MAP) <= set(CONFIG_MAP_KEYS)


def test_config_map_name_must_be_loaded_by_the_caller() -> None:
    assert config_map_name({"configMapName": " zerofs-config "}) == "zerofs-config"
    assert config_map_name({"configMapName": ""}) is None
    assert config_map_name({}) is None
    with pytest.raises(errors.InvalidArgument, match="configMapName"):
        config_map_name({"configMapName": "../etc"})
    with pytest.raises(errors.Internal, match="was not loaded"):
        parse_volume_settings({**BASE, "configMapName": "zerofs-config"})


# --------------------------------------------------------------------------- storage URL


def test_volume_url_and_prefix() -> None:
    url = StorageUrl.parse("s3://bucket/a/b")
    assert url.volume_url("pvc-1") == "s3://bucket/a/b/pvc-1"
    assert url.volume_prefix("pvc-1") == "a/b/pvc-1/"
    root = StorageUrl.parse("s3://bucket")
    assert str(root) == "s3://bucket"
    assert root.volume_url("pvc-1") == "s3://bucket/pvc-1"
    assert root.volume_prefix("pvc-1") == "pvc-1/"
    assert StorageUrl.parse("memory://").volume_url("pvc-1") == "memory:///pvc-1"
    local = StorageUrl.parse("file:///srv/zerofs/")
    assert (str(local), local.is_s3) == ("file:///srv/zerofs", False)
    assert local.volume_url("pvc-1") == "file:///srv/zerofs/pvc-1"
    with pytest.raises(errors.InvalidArgument):
        url.volume_prefix("../pvc-1")


# --------------------------------------------------------------------------- secrets

SECRET_VALUES = {
    "ZEROFS_ENCRYPTION_PASSWORD": "correct horse $battery",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLETOKEN",
    "ZEROFS_CONDITIONAL_PUT_URL": "redis://:redispass@redis:6379",
}


def test_secrets_parse_and_never_show_their_values() -> None:
    secrets = VolumeSecrets.from_csi_secrets({**SECRET_VALUES, "unrelated": "x"})
    assert secrets.encryption_password == SECRET_VALUES["ZEROFS_ENCRYPTION_PASSWORD"]
    assert secrets.access_key_id == SECRET_VALUES["AWS_ACCESS_KEY_ID"]
    assert secrets.secret_access_key == SECRET_VALUES["AWS_SECRET_ACCESS_KEY"]
    assert secrets.session_token == SECRET_VALUES["AWS_SESSION_TOKEN"]
    assert secrets.conditional_put_url == SECRET_VALUES["ZEROFS_CONDITIONAL_PUT_URL"]
    for shown in (repr(secrets), str(secrets), f"{secrets}", f"{secrets} {secrets!r}"):
        for value in SECRET_VALUES.values():
            assert value not in shown
        assert "redacted" in shown


def test_secrets_stay_out_of_log_records(caplog: pytest.LogCaptureFixture) -> None:
    secrets = VolumeSecrets.from_csi_secrets(SECRET_VALUES)
    with caplog.at_level(logging.INFO):
        logging.getLogger("zerofs_csi.test").info("secrets %s %r", secrets, secrets)
    assert "redacted" in caplog.text
    for value in SECRET_VALUES.values():
        assert value not in caplog.text


def test_secrets_password_only() -> None:
    secrets = VolumeSecrets.from_csi_secrets({"ZEROFS_ENCRYPTION_PASSWORD": "pw"})
    assert secrets.access_key_id is None and secrets.secret_access_key is None


@pytest.mark.parametrize(
    ("drop", "override", "fragment"),
    [
        (("ZEROFS_ENCRYPTION_PASSWORD",), {}, "'ZEROFS_ENCRYPTION_PASSWORD'"),
        ((), {"ZEROFS_ENCRYPTION_PASSWORD": ""}, "'ZEROFS_ENCRYPTION_PASSWORD'"),
        (("AWS_SECRET_ACCESS_KEY",), {}, "together"),
        (("AWS_ACCESS_KEY_ID",), {}, "together"),
        (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), {}, "'AWS_SESSION_TOKEN' needs"),
        ((), {"AWS_SECRET_ACCESS_KEY": "bad\x00key"}, "NUL"),
        ((), {"ZEROFS_CONDITIONAL_PUT_URL": "http://:pw@redis"}, "redis://"),
    ],
)
def test_bad_secrets_name_the_key_never_the_value(
    drop: tuple[str, ...], override: dict[str, str], fragment: str
) -> None:
    data = {k: v for k, v in SECRET_VALUES.items() if k not in drop} | override
    with pytest.raises(errors.InvalidArgument) as info:
        VolumeSecrets.from_csi_secrets(data)
    assert fragment in info.value.message
    for value in [*SECRET_VALUES.values(), *override.values()]:
        if value:
            assert value not in info.value.message


def test_settings_carry_no_secret_fields() -> None:
    names = {f.name for f in dataclasses.fields(VolumeSettings)}
    assert not {n for n in names if "password" in n or "secret" in n or "access_key" in n}
