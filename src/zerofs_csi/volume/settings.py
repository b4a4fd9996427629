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
call (``csi.storage.k8s.io/node-stage-secret-*``, ``provisioner-secret-*``), parsed
by ``VolumeSecrets.from_csi_secrets``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from zerofs_csi import errors
from zerofs_csi.nbd import limits as nbd_limits
from zerofs_csi.volume.id import validate_volume_id
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


class _BadValue(ValueError):
    """A value that does not parse; the message says what was expected."""


# ---------------------------------------------------------------------------------
# Value types


BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
KEY_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_S3_SCHEMES = ("s3", "s3a")


@dataclass(frozen=True)
class StorageUrl:
    """The base storage URL of a StorageClass: ``s3://bucket[/path]``, ``file:///dir``
    (a local directory as the object store, for the local backend) or ``memory://``.

    ``path`` has no leading or trailing '/', no empty, '.' or '..' segment, and only
    ``[A-Za-z0-9._-]`` in its segments, so it can be joined with a volume id into an
    S3 key prefix without ambiguity. The chart checks its StorageClasses' s3:// URLs
    with the same rules and words (tests/chart/test_driver_rules.py). ``memory://``
    (ZeroFS's in-memory store) is for tests only: ``parse_volume_settings`` refuses it
    unless told otherwise.
    """

    scheme: str
    bucket: str
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> StorageUrl:
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise _BadValue("a URL such as s3://bucket/path")
        if scheme == "memory":
            if rest not in ("", "/"):
                raise _BadValue("memory:// with no bucket or path")
            return cls(scheme="memory", bucket="", path="")
        if scheme == "file":
            # A directory on the server's host used as the object store (local backend).
            if not rest.startswith("/") or rest.rstrip("/") == "":
                raise _BadValue("file:///absolute/directory (not the root directory)")
            path = rest.strip("/")
            for segment in path.split("/"):
                if not KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
                    raise _BadValue(
                        "file:///absolute/directory made of letters, digits, '.', '_' and '-' "
                        "segments (no '..', '//' or other characters)"
                    )
            return cls(scheme="file", bucket="", path=path)
        if scheme not in _S3_SCHEMES:
            raise _BadValue("an s3:// or s3a:// URL (or file:// with the local backend)")
        bucket, _, path = rest.partition("/")
        if not BUCKET.fullmatch(bucket) or ".." in bucket:
            raise _BadValue(
                "s3://BUCKET[/path] with an S3 bucket name (3-63 characters: lowercase "
                "letters, digits, '.', '-'; a letter or digit first and last; no '..')"
            )
        path = path.removesuffix("/")
        if path:
            for segment in path.split("/"):
                if not KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
                    raise _BadValue(
                        "a path of non-empty segments of letters, digits, '.', '_' and '-' "
                        "(no '..', '//', '*' or other characters)"
                    )
        if len(path) > 512:
            raise _BadValue("a path of at most 512 characters")
        return cls(scheme=scheme, bucket=bucket, path=path)

    @property
    def is_s3(self) -> bool:
        return self.scheme in _S3_SCHEMES

    def __str__(self) -> str:
        if self.scheme == "memory":
            return "memory:///"
        if self.scheme == "file":
            return f"file:///{self.path}"
        return (
            f"{self.scheme}://{self.bucket}/{self.path}"
            if self.path
            else (f"{self.scheme}://{self.bucket}")
        )

    def volume_url(self, volume_id: str) -> str:
        """The URL ZeroFS serves for one volume: ``<base>/<volume id>``."""
        validate_volume_id(volume_id)
        if self.scheme == "memory":
            return f"memory:///{volume_id}"
        return f"{self}/{volume_id}"

    def volume_prefix(self, volume_id: str) -> str:
        """The S3 key prefix holding the volume's objects: ``<path>/<volume id>/``."""
        validate_volume_id(volume_id)
        return f"{self.path}/{volume_id}/" if self.path else f"{volume_id}/"


# Kubernetes resource.Quantity: number, then a binary SI, decimal SI or exponent suffix.
# The grammar is checked here; parse_quantity alone would also take signs, "1_000",
# "Infinity" and "NaN".
_QUANTITY = re.compile(
    r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
# Nobody writes a quantity this long; the bound keeps 5000-digit numbers and exponents
# out of the arithmetic.
MAX_QUANTITY_LENGTH = 64
# Kubernetes keeps quantities in an int64 and clamps larger ones instead of refusing them.
MAX_QUANTITY = 2**63 - 1


def quantity_value(text: str) -> Decimal:
    """The numeric value of a Kubernetes quantity (``500m``, ``1.5Gi``, ``1e3``)."""
    expected = "a Kubernetes quantity such as 500m, 2, 512Mi or 1Gi"
    if len(text) > MAX_QUANTITY_LENGTH or _QUANTITY.fullmatch(text) is None:
        raise _BadValue(expected)
    # Imported here: the kubernetes package takes most of a second to import, and only
    # volumes with resource parameters need it.
    from kubernetes.utils.quantity import parse_quantity

    try:
        value: Decimal = parse_quantity(text)
    except (ValueError, ArithmeticError):
        raise _BadValue(expected) from None
    if value > MAX_QUANTITY:
        raise _BadValue(f"{expected}, at most {MAX_QUANTITY}")
    return value


# ---------------------------------------------------------------------------------
# Value parsers: each takes the stripped raw string and raises _BadValue.


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise _BadValue('"true" or "false"')


def _int_in(low: int, high: int) -> Callable[[str], int]:
    # No more digits than ``high`` has: int() of thousands of digits is slow, then refused.
    digits = re.compile(f"[0-9]{{1,{len(str(high))}}}")

    def parse(raw: str) -> int:
        if not digits.fullmatch(raw) or not low <= int(raw) <= high:
            raise _BadValue(f"an integer from {low} to {high}")
        return int(raw)

    return parse


def _gb_up_to(high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", raw):
            raise _BadValue(f"a number of GB (decimal) greater than 0 and at most {high:g}")
        value = float(raw)
        if not 0 < value <= high:
            raise _BadValue(f"a number of GB (decimal) greater than 0 and at most {high:g}")
        return value

    return parse


def _parse_filesystem(raw: str) -> str:
    if raw not in FILESYSTEMS:
        raise _BadValue("one of " + ", ".join(FILESYSTEMS))
    return raw


def _parse_storage_url(raw: str) -> StorageUrl:
    return StorageUrl.parse(raw)


def _has_control_or_space(raw: str) -> bool:
    # urlsplit drops TAB, CR and LF before parsing, so its parts look clean while the
    # raw value, which is what ZeroFS gets, still has them.
    return any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in raw)


# http(s)://host[:port][/] with a DNS name or IPv4 address, or an IPv6 address in
# brackets. The chart checks StorageClasses with the same grammar and words
# (charts/zerofs-csi/templates/_helpers.tpl; tests/chart/test_driver_rules.py).
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME = rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*"
ENDPOINT = re.compile(rf"https?://({_DNS_NAME}|\[[0-9A-Fa-f:.]+\])(?::([0-9]{{1,5}}))?/?")
ENDPOINT_EXPECTED = (
    "an http:// or https:// URL of a host name, IPv4 address or [IPv6 address] and an "
    "optional port from 1 to 65535, with no path, user or query"
)
REGION = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _parse_endpoint(raw: str) -> str:
    match = ENDPOINT.fullmatch(raw)
    if match is None or (match[2] is not None and not 0 < int(match[2]) < 65536):
        raise _BadValue(ENDPOINT_EXPECTED)
    if match[1].startswith("["):
        try:
            ipaddress.IPv6Address(match[1][1:-1])
        except ValueError:
            raise _BadValue(ENDPOINT_EXPECTED) from None
    return raw.removesuffix("/")


def _parse_region(raw: str) -> str:
    if not REGION.fullmatch(raw):
        raise _BadValue("a region name of letters, digits, '-' and '_' (such as us-east-1)")
    return raw


# An OCI image reference: [registry[:port]/]name[:tag][@sha256:digest].
_IMAGE = re.compile(
    r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def _parse_image(raw: str) -> str:
    if len(raw) > 255 or not _IMAGE.fullmatch(raw):
        raise _BadValue("a container image reference such as ghcr.io/barre/zerofs:2.3.0")
    return raw


def _parse_zerofs_image(raw: str) -> str:
    image = _parse_image(raw)
    version = image_zerofs_version(image)
    if version is not None and not zerofs_version_supported(version):
        raise _BadValue(
            f"a ZeroFS image in the supported range {SUPPORTED_ZEROFS_VERSIONS} "
            f"(such as {DEFAULT_ZEROFS_IMAGE})"
        )
    return image


def _parse_compression(raw: str) -> str:
    match = re.fullmatch(r"zstd-([0-9]{1,2})", raw)
    if raw == "lz4" or (match is not None and 1 <= int(match[1]) <= 22):
        return raw
    raise _BadValue("lz4 or zstd-N with N from 1 to 22")


def _parse_rust_log(raw: str) -> str:
    # tracing-subscriber EnvFilter directives: target[=level], comma separated.
    if not re.fullmatch(r"[A-Za-z0-9_:=,.-]{1,256}", raw):
        raise _BadValue("a RUST_LOG filter such as info or zerofs=debug,slatedb=info")
    return raw


def _parse_redis_url(raw: str) -> str:
    expected = (
        "a redis:// or rediss:// URL with a host and no password (put a URL with a "
        "password in the CSI secret instead)"
    )
    try:
        url = urllib.parse.urlsplit(raw)
        _ = url.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise _BadValue(expected) from exc
    if (
        url.scheme not in ("redis", "rediss")
        or not url.hostname
        or url.password is not None
        or "$" in raw
        or _has_control_or_space(raw)
    ):
        raise _BadValue(expected)
    return raw


def _parse_quantity(raw: str) -> str:
    quantity_value(raw)
    return raw


def _parse_dns_subdomain(raw: str) -> str:
    if len(raw) > 253 or not re.fullmatch(
        r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*", raw
    ):
        raise _BadValue("a Kubernetes object name (DNS-1123 subdomain)")
    return raw


# ---------------------------------------------------------------------------------
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
    _Spec("storageUrl", "storage_url", _parse_storage_url, legacy_key="storageURL"),
    _Spec("s3Endpoint", "s3_endpoint", _parse_endpoint, legacy_key="awsEndpoint"),
    _Spec("s3Region", "s3_region", _parse_region, legacy_key="awsDefaultRegion"),
    _Spec("s3AllowHttp", "s3_allow_http", _parse_bool, legacy_key="awsAllowHTTP"),
    _Spec("image", "image", _parse_zerofs_image, legacy_key="zerofsImage"),
    _Spec("cacheDiskSizeGb", "cache_disk_size_gb", _gb_up_to(100000.0), "cacheDiskSizeGB"),
    _Spec("cacheMemorySizeGb", "cache_memory_size_gb", _gb_up_to(10000.0), "cacheMemorySizeGB"),
    _Spec("compression", "compression", _parse_compression),
    # Lower bounds are ZeroFS's own minimums (LsmConfig::MIN_*, config.rs v2.3.0),
    # below which it silently clamps.
    _Spec("l0MaxSsts", "l0_max_ssts", _int_in(4, 100000), legacy_key="lsmL0MaxSsts"),
    _Spec(
        "maxConcurrentCompactions",
        "max_concurrent_compactions",
        _int_in(1, 256),
        legacy_key="lsmMaxConcurrentCompactions",
    ),
    _Spec(
        "flushIntervalSecs",
        "flush_interval_secs",
        _int_in(5, 86400),
        legacy_key="lsmFlushIntervalSecs",
    ),
    _Spec("rustLog", "rust_log", _parse_rust_log),
    _Spec("conditionalPutRedisUrl", "conditional_put_redis_url", _parse_redis_url, echo=False),
    _Spec("cpuRequest", "cpu_request", _parse_quantity),
    _Spec("cpuLimit", "cpu_limit", _parse_quantity),
    _Spec("memoryRequest", "memory_request", _parse_quantity),
    _Spec("memoryLimit", "memory_limit", _parse_quantity),
    _Spec("podReadyTimeoutSeconds", "pod_ready_timeout_seconds", _int_in(1, 3600)),
    _Spec("nbdConnections", "nbd_connections", _int_in(1, MAX_NBD_CONNECTIONS)),
    _Spec("deleteDataOnPVCDelete", "delete_data_on_pvc_delete", _parse_bool),
    _Spec("envoyEnabled", "envoy_enabled", _parse_bool),
    _Spec("envoyImage", "envoy_image", _parse_image),
    _Spec(
        "envoyConfigMapName",
        "envoy_config_map_name",
        _parse_dns_subdomain,
        legacy_key="envoyConfigMapRef",
    ),
    _Spec("telemetryEnabled", "telemetry_enabled", _parse_bool),
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
        return _parse_dns_subdomain(raw)
    except _BadValue as exc:
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
        except _BadValue as exc:
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


# ---------------------------------------------------------------------------------
# Secrets

# Keys of the CSI secret (a Kubernetes Secret's data). The AWS names match the Go
# driver's credentials Secret so an existing Secret can be referenced directly.
SECRET_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SECRET_SESSION_TOKEN = "AWS_SESSION_TOKEN"
SECRET_ENCRYPTION_PASSWORD = "ZEROFS_ENCRYPTION_PASSWORD"
SECRET_CONDITIONAL_PUT_URL = "ZEROFS_CONDITIONAL_PUT_URL"


@dataclass(frozen=True, repr=False)
class VolumeSecrets:
    """S3 credentials and the ZeroFS encryption password of a volume.

    ``repr``/``str`` list which secrets are present, never their values.
    """

    encryption_password: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # A redis:// URL for [aws] conditional_put that may carry a password.
    conditional_put_url: str | None = None

    def __repr__(self) -> str:
        present = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        return f"VolumeSecrets(<redacted: {', '.join(present)}>)"

    __str__ = __repr__

    @classmethod
    def from_csi_secrets(cls, secrets: Mapping[str, str]) -> VolumeSecrets:
        """Parse the secrets map of a CSI call. Unrelated keys are ignored.

        Errors name the missing or malformed key, never a value.
        """

        def get(key: str) -> str | None:
            value = secrets.get(key)
            if value is None or value == "":
                return None
            if "\x00" in value:
                # Environment variables cannot carry NUL, and ZeroFS gets these via env.
                raise errors.InvalidArgument(f"secret key {key!r} contains a NUL character")
            return value

        password = get(SECRET_ENCRYPTION_PASSWORD)
        if password is None:
            raise errors.InvalidArgument(
                f"secret key {SECRET_ENCRYPTION_PASSWORD!r} (the ZeroFS encryption password) "
                "is missing: reference a Secret that has it with the StorageClass parameters "
                "csi.storage.k8s.io/node-stage-secret-name/-namespace and "
                "csi.storage.k8s.io/provisioner-secret-name/-namespace"
            )
        access_key_id = get(SECRET_ACCESS_KEY_ID)
        secret_access_key = get(SECRET_SECRET_ACCESS_KEY)
        session_token = get(SECRET_SESSION_TOKEN)
        if (access_key_id is None) != (secret_access_key is None):
            raise errors.InvalidArgument(
                f"secret keys {SECRET_ACCESS_KEY_ID!r} and {SECRET_SECRET_ACCESS_KEY!r} must "
                "be given together (or both left out to use the node's ambient credentials)"
            )
        if session_token is not None and access_key_id is None:
            raise errors.InvalidArgument(
                f"secret key {SECRET_SESSION_TOKEN!r} needs {SECRET_ACCESS_KEY_ID!r} and "
                f"{SECRET_SECRET_ACCESS_KEY!r}"
            )
        conditional_put_url = get(SECRET_CONDITIONAL_PUT_URL)
        if conditional_put_url is not None and not conditional_put_url.startswith(
            ("redis://", "rediss://")
        ):
            raise errors.InvalidArgument(
                f"secret key {SECRET_CONDITIONAL_PUT_URL!r} must be a redis:// or rediss:// URL"
            )
        return cls(
            encryption_password=password,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            conditional_put_url=conditional_put_url,
        )


__all__ = [
    "CONFIG_MAP_KEYS",
    "FILESYSTEMS",
    "IGNORED_LEGACY_KEYS",
    "PARAMETER_KEYS",
    "StorageUrl",
    "VolumeSecrets",
    "VolumeSettings",
    "config_map_name",
    "parse_volume_settings",
    "quantity_value",
    "validate_volume_id",
]
