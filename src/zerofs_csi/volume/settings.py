"""Per-volume settings: StorageClass parameters, then a legacy ConfigMap, then defaults.

Parameters arrive as strings (CreateVolume ``parameters``, or the volume context the
controller derives from them with ``VolumeSettings.to_parameters``). Parsing is strict:
an unknown key or an ill-typed value is INVALID_ARGUMENT naming the key. Keys under the
Kubernetes-reserved prefixes ``csi.storage.k8s.io/`` and ``storage.kubernetes.io/``
(added by the external-provisioner in some versions) are ignored.

``configMapName`` keeps the Go driver's StorageClasses working: it names a ConfigMap
whose data supplies settings under the Go driver's keys (``storageURL``, ``awsEndpoint``,
``zerofsImage``, ...) or under this driver's parameter names. Reading the ConfigMap
needs the Kubernetes API, so the caller fetches it (see ``config_map_name``) and passes
its data in; this module stays pure.

Secrets never come from parameters or the ConfigMap: they are the CSI secrets of the
call (``secrets``). The value types are in ``values`` and ``storage_url``; this module
holds the table of keys and the rules between them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zerofs_csi import errors
from zerofs_csi.nbd import limits as nbd_limits
from zerofs_csi.volume.storage_url import StorageUrl
from zerofs_csi.volume.values import (
    BadValue,
    gb_up_to,
    int_in,
    parse_bool,
    parse_compression,
    parse_dns_subdomain,
    parse_endpoint,
    parse_image,
    parse_quantity,
    parse_redis_url,
    parse_region,
    parse_rust_log,
    quantity_value,
)
from zerofs_csi.volume.zerofs_version import (
    DEFAULT_ZEROFS_VERSION,
    SUPPORTED_ZEROFS_VERSIONS,
    ZEROFS_IMAGE_REPOSITORY,
    image_zerofs_version,
    zerofs_version_supported,
)

FILESYSTEMS = ("ext4", "xfs", "btrfs")
DEFAULT_FILESYSTEM = "ext4"
DEFAULT_ZEROFS_IMAGE = f"{ZEROFS_IMAGE_REPOSITORY}:{DEFAULT_ZEROFS_VERSION}"
# Pinned like the Go driver's default; used only when envoyEnabled is true.
DEFAULT_ENVOY_IMAGE = "envoyproxy/envoy-distroless:v1.34.4"
DEFAULT_ENVOY_CONFIG_MAP = "envoy-config"
# The Go driver's defaults for the cache (decimal GB, as ZeroFS reads them).
DEFAULT_CACHE_DISK_SIZE_GB = 1.0
DEFAULT_CACHE_MEMORY_SIZE_GB = 1.0
# Long enough for an image pull on a cold node (the Go driver's default).
DEFAULT_POD_READY_TIMEOUT_SECONDS = 120
# NBD connections per device when the server offers multi-conn: the attach path's
# default and bound. Each one costs the kernel a queue freeze, one RCU grace period,
# when the device is connected.
DEFAULT_NBD_CONNECTIONS = nbd_limits.DEFAULT_CONNECTIONS
MAX_NBD_CONNECTIONS = nbd_limits.MAX_CONNECTIONS
DEFAULT_RUST_LOG = "info"

CONFIG_MAP_PARAMETER = "configMapName"
RESERVED_PREFIXES = ("csi.storage.k8s.io/", "storage.kubernetes.io/")

# Go driver ConfigMap keys that are accepted so that existing ConfigMaps still parse,
# but have no effect here, and why.
IGNORED_LEGACY_KEYS: Mapping[str, str] = {
    "cacheDir": "the cache directory is chosen by the driver for each volume",
    "lsmMaxUnflushedGB": "ZeroFS 2.3 removed [lsm] max_unflushed_gb",
    "filesystemMaxSizeGB": (
        "the volume's capacity is the NBD export size; a smaller ZeroFS quota would "
        "surface as I/O errors inside the filesystem"
    ),
    "awsCredentialsSecretName": (
        "S3 credentials come from the CSI secrets "
        "(csi.storage.k8s.io/node-stage-secret-name and provisioner-secret-name)"
    ),
    "encryptionPasswordSecretName": (
        "the encryption password comes from the CSI secrets "
        "(csi.storage.k8s.io/node-stage-secret-name and provisioner-secret-name)"
    ),
}


# Parsers of the values whose rules are the settings' own.


def _parse_filesystem(raw: str) -> str:
    if raw not in FILESYSTEMS:
        raise BadValue("one of " + ", ".join(FILESYSTEMS))
    return raw


def _parse_zerofs_image(raw: str) -> str:
    image = parse_image(raw)
    version = image_zerofs_version(image)
    if version is not None and not zerofs_version_supported(version):
        raise BadValue(
            f"a ZeroFS image in the supported range {SUPPORTED_ZEROFS_VERSIONS} "
            f"(such as {DEFAULT_ZEROFS_IMAGE})"
        )
    return image


# The settings table


@dataclass(frozen=True)
class _Spec:
    key: str  # StorageClass parameter name
    attr: str  # VolumeSettings attribute
    parse: Callable[[str], Any]
    legacy_key: str | None = None  # the Go driver's ConfigMap key, when it differs
    echo: bool = True  # whether an invalid value may be quoted in the error


_SPECS = (
    _Spec("filesystem", "filesystem", _parse_filesystem),
    _Spec("storageUrl", "storage_url", StorageUrl.parse, legacy_key="storageURL"),
    _Spec("s3Endpoint", "s3_endpoint", parse_endpoint, legacy_key="awsEndpoint"),
    _Spec("s3Region", "s3_region", parse_region, legacy_key="awsDefaultRegion"),
    _Spec("s3AllowHttp", "s3_allow_http", parse_bool, legacy_key="awsAllowHTTP"),
    _Spec("image", "image", _parse_zerofs_image, legacy_key="zerofsImage"),
    _Spec("cacheDiskSizeGb", "cache_disk_size_gb", gb_up_to(100000.0), "cacheDiskSizeGB"),
    _Spec("cacheMemorySizeGb", "cache_memory_size_gb", gb_up_to(10000.0), "cacheMemorySizeGB"),
    _Spec("compression", "compression", parse_compression),
    # Lower bounds are ZeroFS's own minimums (LsmConfig::MIN_*, config.rs v2.3.0),
    # below which it silently clamps.
    _Spec("l0MaxSsts", "l0_max_ssts", int_in(4, 100000), legacy_key="lsmL0MaxSsts"),
    _Spec(
        "maxConcurrentCompactions",
        "max_concurrent_compactions",
        int_in(1, 256),
        legacy_key="lsmMaxConcurrentCompactions",
    ),
    _Spec(
        "flushIntervalSecs",
        "flush_interval_secs",
        int_in(5, 86400),
        legacy_key="lsmFlushIntervalSecs",
    ),
    _Spec("syncWrites", "sync_writes", parse_bool),
    _Spec("rustLog", "rust_log", parse_rust_log),
    _Spec("conditionalPutRedisUrl", "conditional_put_redis_url", parse_redis_url, echo=False),
    _Spec("cpuRequest", "cpu_request", parse_quantity),
    _Spec("cpuLimit", "cpu_limit", parse_quantity),
    _Spec("memoryRequest", "memory_request", parse_quantity),
    _Spec("memoryLimit", "memory_limit", parse_quantity),
    _Spec("podReadyTimeoutSeconds", "pod_ready_timeout_seconds", int_in(1, 3600)),
    _Spec("nbdConnections", "nbd_connections", int_in(1, MAX_NBD_CONNECTIONS)),
    _Spec("deleteDataOnPVCDelete", "delete_data_on_pvc_delete", parse_bool),
    _Spec("envoyEnabled", "envoy_enabled", parse_bool),
    _Spec("envoyImage", "envoy_image", parse_image),
    _Spec(
        "envoyConfigMapName",
        "envoy_config_map_name",
        parse_dns_subdomain,
        legacy_key="envoyConfigMapRef",
    ),
    _Spec("telemetryEnabled", "telemetry_enabled", parse_bool),
)
_SPEC_BY_KEY = {spec.key: spec for spec in _SPECS}
_SPEC_BY_CONFIG_MAP_KEY = {
    **{spec.key: spec for spec in _SPECS},
    **{spec.legacy_key: spec for spec in _SPECS if spec.legacy_key},
}
PARAMETER_KEYS = tuple(sorted([*_SPEC_BY_KEY, CONFIG_MAP_PARAMETER]))
CONFIG_MAP_KEYS = tuple(sorted([*_SPEC_BY_CONFIG_MAP_KEY, *IGNORED_LEGACY_KEYS]))


@dataclass(frozen=True)
class VolumeSettings:
    """Everything the driver needs to know about a volume's ZeroFS server, typed."""

    storage_url: StorageUrl
    filesystem: str = DEFAULT_FILESYSTEM
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_allow_http: bool = False
    image: str = DEFAULT_ZEROFS_IMAGE
    cache_disk_size_gb: float = DEFAULT_CACHE_DISK_SIZE_GB
    cache_memory_size_gb: float = DEFAULT_CACHE_MEMORY_SIZE_GB
    # None leaves ZeroFS's own default (zstd-3).
    compression: str | None = None
    # None leaves ZeroFS's defaults (256, 2, 30 in 2.3). The Go driver's 16/8 would
    # make flushes stall on compaction in 2.3, which disabled the WAL.
    l0_max_ssts: int | None = None
    max_concurrent_compactions: int | None = None
    flush_interval_secs: int | None = None
    # ZeroFS's [lsm] sync_writes: each write durable before it is answered. Without it a
    # server that dies other than by its graceful shutdown may lose acknowledged writes,
    # and the node fails the volume's device instead of reconnecting it (servers.lives).
    sync_writes: bool = False
    rust_log: str = DEFAULT_RUST_LOG
    conditional_put_redis_url: str | None = None
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    pod_ready_timeout_seconds: int = DEFAULT_POD_READY_TIMEOUT_SECONDS
    nbd_connections: int = DEFAULT_NBD_CONNECTIONS
    delete_data_on_pvc_delete: bool = False
    envoy_enabled: bool = False
    envoy_image: str = DEFAULT_ENVOY_IMAGE
    envoy_config_map_name: str = DEFAULT_ENVOY_CONFIG_MAP
    # Off by default: ZeroFS reports usage to PostHog when enabled, from every
    # per-volume server.
    telemetry_enabled: bool = False
    # Not a parameter: the node serves a ReadOnlyMany volume with ``run --read-only``.
    read_only_server: bool = False
    # ConfigMap keys of the Go driver that were present but have no effect here
    # (see IGNORED_LEGACY_KEYS); the caller may warn about them.
    ignored_legacy_keys: tuple[str, ...] = field(default=(), compare=False)

    def to_parameters(self) -> dict[str, str]:
        """The settings as string parameters, for the volume context.

        Only values that differ from the defaults are included; parsing the result
        gives back equal settings.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        parameters = {}
        for spec in _SPECS:
            value = getattr(self, spec.attr)
            if spec.attr != "storage_url" and value == defaults[spec.attr]:
                continue
            parameters[spec.key] = _format_value(value)
        return parameters

    def resources(self) -> dict[str, dict[str, str]]:
        """Container resources for the ZeroFS pod, in the Kubernetes API's shape."""
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        result = {}
        for name, table in (("requests", requests), ("limits", limits)):
            present = {key: value for key, value in table.items() if value is not None}
            if present:
                result[name] = present
        return result


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def config_map_name(parameters: Mapping[str, str]) -> str | None:
    """The ConfigMap named by ``configMapName``, which the caller must fetch, or None."""
    raw = parameters.get(CONFIG_MAP_PARAMETER, "").strip()
    if not raw:
        return None
    try:
        return parse_dns_subdomain(raw)
    except BadValue as exc:
        raise errors.InvalidArgument(
            f"StorageClass parameter {CONFIG_MAP_PARAMETER!r}: expected {exc}; got {raw!r}"
        ) from None


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 100 else raw[:100] + "...")


def parse_volume_settings(
    parameters: Mapping[str, str],
    config_map_data: Mapping[str, str] | None = None,
    *,
    allow_memory_store: bool = False,
) -> VolumeSettings:
    """Parse settings with precedence: parameters, then ConfigMap data, then defaults.

    ``config_map_data`` is the ``data`` of the ConfigMap named by
    ``config_map_name(parameters)``; it is required when that name is set. Empty
    values count as unset (the Go driver's ConfigMaps list keys with empty values).
    A ``memory://`` storage URL is refused unless ``allow_memory_store`` (tests only).
    Raises InvalidArgument naming the offending key.
    """
    cm_name = config_map_name(parameters)
    if cm_name is not None and config_map_data is None:
        raise errors.Internal(
            f"ConfigMap {cm_name!r} named by {CONFIG_MAP_PARAMETER!r} was not loaded"
        )

    from_parameters: dict[str, str] = {}
    for key, raw in parameters.items():
        if key.startswith(RESERVED_PREFIXES) or key == CONFIG_MAP_PARAMETER:
            continue
        if key not in _SPEC_BY_KEY:
            raise errors.InvalidArgument(
                f"unknown StorageClass parameter {key!r}; known parameters: "
                + ", ".join(PARAMETER_KEYS)
            )
        if raw.strip():
            from_parameters[key] = raw.strip()

    from_config_map: dict[str, tuple[str, str]] = {}  # parameter key -> (cm key, raw)
    ignored: list[str] = []
    for key, raw in (config_map_data or {}).items():
        if key in IGNORED_LEGACY_KEYS:
            ignored.append(key)
            continue
        spec = _SPEC_BY_CONFIG_MAP_KEY.get(key)
        if spec is None:
            raise errors.InvalidArgument(
                f"unknown key {key!r} in ConfigMap {cm_name!r}; known keys: "
                + ", ".join(CONFIG_MAP_KEYS)
            )
        if not raw.strip():
            continue
        previous = from_config_map.get(spec.key)
        if previous is not None and previous[1] != raw.strip():
            raise errors.InvalidArgument(
                f"ConfigMap {cm_name!r} sets {spec.key!r} twice with different values "
                f"(keys {previous[0]!r} and {key!r})"
            )
        from_config_map[spec.key] = (key, raw.strip())

    values: dict[str, Any] = {}
    for spec in _SPECS:
        if spec.key in from_parameters:
            raw, source = from_parameters[spec.key], f"StorageClass parameter {spec.key!r}"
        elif spec.key in from_config_map:
            cm_key, raw = from_config_map[spec.key]
            source = f"ConfigMap {cm_name!r} key {cm_key!r}"
        else:
            continue
        try:
            values[spec.attr] = spec.parse(raw)
        except BadValue as exc:
            got = f"; got {_shown(raw)}" if spec.echo else ""
            raise errors.InvalidArgument(f"{source}: expected {exc}{got}") from None
        memory = spec.attr == "storage_url" and values[spec.attr].scheme == "memory"
        if memory and not allow_memory_store:
            raise errors.InvalidArgument(
                f"{source}: memory:// keeps a volume only in its server's memory, lost at "
                "every server restart; use s3:// (or file:// with the local backend)"
            )

    if "storage_url" not in values:
        raise errors.InvalidArgument(
            "StorageClass parameter 'storageUrl' is required (s3://bucket/path; or "
            f"'storageURL' in the ConfigMap named by {CONFIG_MAP_PARAMETER!r})"
        )
    settings = VolumeSettings(**values, ignored_legacy_keys=tuple(sorted(ignored)))
    _check_consistency(settings)
    return settings


def _check_consistency(settings: VolumeSettings) -> None:
    if not settings.storage_url.is_s3:
        for attr, key in (
            ("s3_endpoint", "s3Endpoint"),
            ("s3_region", "s3Region"),
            ("conditional_put_redis_url", "conditionalPutRedisUrl"),
        ):
            if getattr(settings, attr) is not None:
                raise errors.InvalidArgument(f"{key!r} applies only to an s3:// storageUrl")
        if settings.s3_allow_http:
            raise errors.InvalidArgument("'s3AllowHttp' applies only to an s3:// storageUrl")
        if settings.delete_data_on_pvc_delete:
            raise errors.InvalidArgument(
                "'deleteDataOnPVCDelete' applies only to an s3:// storageUrl"
            )
    if (
        settings.s3_endpoint is not None
        and settings.s3_endpoint.startswith("http://")
        and not settings.s3_allow_http
    ):
        raise errors.InvalidArgument(
            "'s3Endpoint' is a plain http:// URL: set 's3AllowHttp' to \"true\" to allow "
            "unencrypted S3 traffic, or use https://"
        )
    for resource in ("cpu", "memory"):
        request = getattr(settings, f"{resource}_request")
        limit = getattr(settings, f"{resource}_limit")
        if (
            request is not None
            and limit is not None
            and (quantity_value(request) > quantity_value(limit))
        ):
            raise errors.InvalidArgument(
                f"'{resource}Request' ({request}) is greater than '{resource}Limit' ({limit})"
            )
