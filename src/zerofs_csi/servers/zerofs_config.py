"""Render a volume's ZeroFS configuration file (TOML) from typed settings.

The file is produced by a TOML writer (tomli_w) from typed values, never from a text
template, so no setting can add keys or tables. It targets a stated ZeroFS version
range and is checked against the keys that range accepts before it is returned.

Keys were read from ZeroFS's ``zerofs/src/config.rs`` at tag v2.3.0 (every table but
``[aws]``/``[azure]``/``[gcp]`` is ``deny_unknown_fields``) and its configuration page
(``documentation/src/app/configuration/page.mdx``).

Secrets. ZeroFS expands ``$VAR``/``${VAR}`` in ``[storage] encryption_password`` and in
every ``[aws]`` value (configuration page, "Environment Variable Substitution"). The
rendered file therefore holds only placeholders such as
``${ZEROFS_CSI_ENCRYPTION_PASSWORD}``; the values travel separately in
``RenderedConfig.secret_env``. The caller stores those values in the volume's
Kubernetes Secret and hands them to the container with ``valueFrom.secretKeyRef``, so
they never appear in the pod spec, its args or plain env values. Why placeholders
rather than literal values in a Secret-held file:

- ZeroFS expands ``$`` inside those keys and ``$`` has to be doubled to stay literal;
  a password or secret key containing ``$`` would be silently altered. Values that
  arrive through the environment are not expanded again.
- The config text carries no secret, so it can be compared, hashed or shown in a
  diagnostic without leaking anything.

For the same reason literal values placed in keys that ZeroFS expands (storage URL,
socket paths, cache dir, ``[aws]`` values) must not contain ``$``; settings parsing
and this module reject it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import tomli_w

from zerofs_csi import errors
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.zerofs_version import SUPPORTED_ZEROFS_VERSIONS

if TYPE_CHECKING:
    from zerofs_csi.volume.secrets import VolumeSecrets
    from zerofs_csi.volume.settings import VolumeSettings

# Keys ZeroFS 2.3 accepts in the tables this module writes (config.rs, v2.3.0). The
# renderer refuses to return a document with any other key.
ACCEPTED_KEYS: Mapping[str, frozenset[str]] = {
    "": frozenset(
        {
            "cache",
            "storage",
            "servers",
            "filesystem",
            "lsm",
            "gc",
            "aws",
            "azure",
            "gcp",
            "telemetry",
            "prometheus",
            "replication",
        }
    ),
    "cache": frozenset({"dir", "disk_size_gb", "memory_size_gb", "warm_metadata"}),
    "storage": frozenset({"url", "encryption_password", "storage_class"}),
    "servers": frozenset({"nfs", "ninep", "nbd", "rpc", "webui"}),
    "servers.ninep": frozenset({"addresses", "unix_socket"}),
    "servers.nbd": frozenset({"addresses", "unix_socket"}),
    "servers.rpc": frozenset({"addresses", "unix_socket"}),
    "filesystem": frozenset({"max_size_gb", "compression", "ignore_fsync"}),
    "lsm": frozenset(
        {"l0_max_ssts", "max_concurrent_compactions", "flush_interval_secs", "sync_writes"}
    ),
    "telemetry": frozenset({"enabled"}),
}
# [aws] is free-form in ZeroFS (unknown keys silently dropped), so a misspelling
# would be lost without an error: restrict it to the object_store keys we mean.
# Each key is forwarded as "aws_<key>" to object_store's AmazonS3ConfigKey parser.
AWS_KEYS = frozenset(
    {
        "access_key_id",
        "secret_access_key",
        "session_token",
        "region",
        "endpoint",
        "allow_http",
        "conditional_put",
    }
)

# Environment variables that carry secrets into the ZeroFS container. A ZEROFS_CSI_
# prefix keeps them apart from the AWS_* variables that object_store's
# AmazonS3Builder::from_env() would also read on its own.
ENV_ENCRYPTION_PASSWORD = "ZEROFS_CSI_ENCRYPTION_PASSWORD"
ENV_ACCESS_KEY_ID = "ZEROFS_CSI_AWS_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY = "ZEROFS_CSI_AWS_SECRET_ACCESS_KEY"
ENV_SESSION_TOKEN = "ZEROFS_CSI_AWS_SESSION_TOKEN"
ENV_CONDITIONAL_PUT = "ZEROFS_CSI_CONDITIONAL_PUT_URL"

# sun_path is 108 bytes including the terminating NUL (<sys/un.h>, unix(7)).
UNIX_SOCKET_PATH_MAX = 107

_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def placeholder(env_name: str) -> str:
    """The ``${NAME}`` reference ZeroFS replaces with an environment variable's value."""
    if not _ENV_NAME.fullmatch(env_name):
        raise ValueError(f"not an environment variable name: {env_name!r}")
    return "${" + env_name + "}"


@dataclass(frozen=True)
class RenderedConfig:
    """A volume's ``config.toml`` and the environment that fills its placeholders.

    ``secret_env`` maps each environment variable named by a placeholder in
    ``toml_text`` to its secret value. Store the values in the volume's Kubernetes
    Secret (key = variable name) and reference them with ``valueFrom.secretKeyRef``;
    never put them in a pod spec as plain values. ``repr`` shows only the names.
    """

    toml_text: str
    secret_env: Mapping[str, str] = field(repr=False)

    def __repr__(self) -> str:
        names = ", ".join(sorted(self.secret_env))
        return f"RenderedConfig(toml_text=<{len(self.toml_text)} chars>, secret_env=[{names}])"

    __str__ = __repr__


def _literal(name: str, value: str) -> str:
    """A literal value for a key that ZeroFS expands: no '$', no control characters."""
    if "$" in value:
        raise errors.InvalidArgument(
            f"{name} must not contain '$': ZeroFS expands environment variables in it"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise errors.InvalidArgument(f"{name} must not contain control characters")
    return value


def _socket_path(name: str, path: str) -> str:
    _literal(name, path)
    if not PurePosixPath(path).is_absolute():
        raise errors.InvalidArgument(f"{name} must be an absolute path, got {path!r}")
    if len(path.encode()) > UNIX_SOCKET_PATH_MAX:
        raise errors.InvalidArgument(
            f"{name} {path!r} is {len(path.encode())} bytes; a unix socket path may have "
            f"at most {UNIX_SOCKET_PATH_MAX}"
        )
    return path


def _positive_float(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise errors.InvalidArgument(f"{name} must be a positive number")
    return float(value)


def render_zerofs_config(
    settings: VolumeSettings,
    volume_id: str,
    secrets: VolumeSecrets,
    *,
    cache_dir: str,
    nbd_socket: str,
    ninep_socket: str,
    rpc_socket: str | None = None,
) -> RenderedConfig:
    """Render the ZeroFS config for one volume.

    The storage URL is ``<settings.storage_url>/<volume_id>``: one ZeroFS writer per
    volume. NBD, 9P and (optionally) RPC listen on the given unix sockets only; no TCP
    listener is configured, because ZeroFS's NBD server has no authentication.
    Raises InvalidArgument for unusable inputs (unsafe id, relative or too long socket
    path, '$' in an expanded value).
    """
    validate_volume_id(volume_id)
    cache_dir = _literal("cache dir", cache_dir)
    if not PurePosixPath(cache_dir).is_absolute():
        raise errors.InvalidArgument(f"cache dir must be an absolute path, got {cache_dir!r}")

    secret_env: dict[str, str] = {ENV_ENCRYPTION_PASSWORD: secrets.encryption_password}
    storage_url = _literal("storage URL", settings.storage_url.volume_url(volume_id))
    document: dict[str, Any] = {
        "cache": {
            "dir": cache_dir,
            "disk_size_gb": _positive_float("cacheDiskSizeGb", settings.cache_disk_size_gb),
            "memory_size_gb": _positive_float("cacheMemorySizeGb", settings.cache_memory_size_gb),
        },
        "storage": {
            "url": storage_url,
            "encryption_password": placeholder(ENV_ENCRYPTION_PASSWORD),
        },
    }

    servers: dict[str, Any] = {
        "nbd": {"unix_socket": _socket_path("NBD socket", nbd_socket)},
        "ninep": {"unix_socket": _socket_path("9P socket", ninep_socket)},
    }
    if rpc_socket is not None:
        servers["rpc"] = {"unix_socket": _socket_path("RPC socket", rpc_socket)}
    if len({s["unix_socket"] for s in servers.values()}) != len(servers):
        raise errors.InvalidArgument("the NBD, 9P and RPC sockets must be distinct paths")
    document["servers"] = servers

    if settings.compression is not None:
        document["filesystem"] = {"compression": settings.compression}

    lsm = {
        "l0_max_ssts": settings.l0_max_ssts,
        "max_concurrent_compactions": settings.max_concurrent_compactions,
        "flush_interval_secs": settings.flush_interval_secs,
        "sync_writes": True if settings.sync_writes else None,
    }
    lsm = {key: value for key, value in lsm.items() if value is not None}
    if lsm:
        document["lsm"] = lsm

    document["telemetry"] = {"enabled": settings.telemetry_enabled}

    if settings.storage_url.is_s3:
        aws: dict[str, str] = {"allow_http": "true" if settings.s3_allow_http else "false"}
        if settings.s3_endpoint is not None:
            aws["endpoint"] = _literal("s3Endpoint", settings.s3_endpoint)
        if settings.s3_region is not None:
            aws["region"] = _literal("s3Region", settings.s3_region)
        if secrets.access_key_id is not None and secrets.secret_access_key is not None:
            aws["access_key_id"] = placeholder(ENV_ACCESS_KEY_ID)
            aws["secret_access_key"] = placeholder(ENV_SECRET_ACCESS_KEY)
            secret_env[ENV_ACCESS_KEY_ID] = secrets.access_key_id
            secret_env[ENV_SECRET_ACCESS_KEY] = secrets.secret_access_key
            if secrets.session_token is not None:
                aws["session_token"] = placeholder(ENV_SESSION_TOKEN)
                secret_env[ENV_SESSION_TOKEN] = secrets.session_token
        # A Redis URL from the secret (it may carry a password) wins over the
        # StorageClass one, which parsing guarantees has none.
        if secrets.conditional_put_url is not None:
            aws["conditional_put"] = placeholder(ENV_CONDITIONAL_PUT)
            secret_env[ENV_CONDITIONAL_PUT] = secrets.conditional_put_url
        elif settings.conditional_put_redis_url is not None:
            aws["conditional_put"] = _literal(
                "conditionalPutRedisUrl", settings.conditional_put_redis_url
            )
        document["aws"] = aws

    check_accepted_keys(document)
    return RenderedConfig(toml_text=tomli_w.dumps(document), secret_env=secret_env)


def check_accepted_keys(document: Mapping[str, Any]) -> None:
    """Raise Internal if ``document`` has a key outside ACCEPTED_KEYS / AWS_KEYS.

    ``[aws]`` values must all be strings: ZeroFS fails to parse any other type there.
    """

    def walk(table: Mapping[str, Any], path: str) -> None:
        accepted = AWS_KEYS if path == "aws" else ACCEPTED_KEYS.get(path)
        if accepted is None:
            raise errors.Internal(f"ZeroFS config: table [{path}] is not one we may write")
        for key, value in table.items():
            where = f"{path}.{key}" if path else key
            if key not in accepted:
                raise errors.Internal(
                    f"ZeroFS config: key {where} is not accepted by ZeroFS "
                    f"{SUPPORTED_ZEROFS_VERSIONS}"
                )
            if path == "aws" and not isinstance(value, str):
                raise errors.Internal(f"ZeroFS config: {where} must be a string")
            if isinstance(value, Mapping):
                walk(value, where)

    walk(document, "")
