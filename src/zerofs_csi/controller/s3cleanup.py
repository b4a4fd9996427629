"""Delete a volume's objects from S3 when its PVC is deleted (``deleteDataOnPVCDelete``).

Guardrails, in order:

- The key prefix is derived as ``<storage URL path>/<volume id>/``; no parameter
  supplies it whole. It is then checked on its own: not empty, not the bucket root,
  ending with ``/<volume id>/``, no empty, '.' or '..' segment, no '*' or '?'.
- Plain http is refused unless ``s3AllowHttp`` is true.
- The whole prefix is listed first, and every listed key must start with the prefix;
  otherwise nothing at all is deleted.

Deletion pages through ListObjectsV2 with botocore's paginator (which also stops a
listing that hands back the continuation token it just gave) and deletes in DeleteObjects
batches of at most 1000 keys (the API's limit). botocore retries throttling, server
errors and lost connections (its standard mode: capped, jittered exponential backoff
under a retry quota); the keys a successful DeleteObjects answer reports as failed with
a transient code are sent again here. When retries run out, or any key fails to delete,
the call raises (UNAVAILABLE for transient trouble) so that DeleteVolume keeps failing
and the provisioner retries. Partial deletion is never reported as success. Errors
carry S3 error codes and exception class names only, never credentials.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from zerofs_csi import errors
from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import BUCKET

log = logging.getLogger(__name__)

# DeleteObjects accepts at most 1000 keys per request, and ListObjectsV2 returns at
# most 1000 keys per page (Amazon S3 API Reference, DeleteObjects / ListObjectsV2).
DELETE_BATCH_MAX = 1000
LIST_PAGE_MAX = 1000

# Attempts botocore makes of one request, the first included, before it gives up.
S3_MAX_ATTEMPTS = 5

# Error codes S3 (and S3-compatible stores) answer when a request, or one key of a
# DeleteObjects batch, may succeed later. A per-key error has no HTTP status of its own.
# MinIO answers SlowDownWrite (SlowDownRead) for a key while its erasure set lacks write
# (read) quorum, as it does for up to its reconnect interval after a server that was
# down for half a minute or more is back.
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownWrite",
        "SlowDownRead",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


@dataclass(frozen=True)
class KeyRetryPolicy:
    """Retries of the keys a DeleteObjects answer reports as failed, which botocore,
    retrying whole requests, never sees: ``attempts`` tries in all, sleeping a random
    time up to ``min(max_delay, base_delay * 2**(n-1))`` after the n-th (full jitter)."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, failures: int) -> float:
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (failures - 1)))


@dataclass(frozen=True)
class CleanupTarget:
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def check_prefix(prefix: str, volume_id: str) -> None:
    """Raise FailedPrecondition unless ``prefix`` is a safe prefix for ``volume_id``."""

    def refuse(reason: str) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            f"refusing to delete S3 data for volume {volume_id!r} under prefix {prefix!r}: {reason}"
        )

    if prefix.strip("/") == "":
        raise refuse("the prefix is empty or the bucket root")
    if not prefix.endswith("/"):
        raise refuse("the prefix must end with '/'")
    if prefix != f"{volume_id}/" and not prefix.endswith(f"/{volume_id}/"):
        raise refuse("the prefix does not end with the volume id")
    if "*" in prefix or "?" in prefix:
        raise refuse("the prefix contains a wildcard character")
    segments = prefix[:-1].split("/")
    if "" in segments:
        raise refuse("the prefix has an empty segment")
    if ".." in prefix or "." in segments:
        raise refuse("the prefix has a '.' or '..' segment")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        raise refuse("the prefix contains a control character")


def cleanup_target(settings: VolumeSettings, volume_id: str) -> CleanupTarget:
    """The bucket and key prefix holding a volume's objects, after every guardrail."""
    validate_volume_id(volume_id)
    url = settings.storage_url
    if not url.is_s3:
        raise errors.FailedPrecondition(
            f"deleteDataOnPVCDelete needs an s3:// storage URL, not {url.scheme}://"
        )
    if not BUCKET.fullmatch(url.bucket) or ".." in url.bucket:
        raise errors.FailedPrecondition(
            f"refusing to delete S3 data for volume {volume_id!r}: "
            f"bucket name {url.bucket!r} is not valid"
        )
    prefix = url.volume_prefix(volume_id)
    check_prefix(prefix, volume_id)
    return CleanupTarget(bucket=url.bucket, prefix=prefix)


def check_endpoint(settings: VolumeSettings) -> str | None:
    """The endpoint URL to use (None: AWS over https), refusing unapproved plain http."""
    endpoint = settings.s3_endpoint
    if endpoint is None:
        return None
    scheme = urllib.parse.urlsplit(endpoint).scheme
    if scheme == "http" and not settings.s3_allow_http:
        raise errors.FailedPrecondition(
            f"refusing to send S3 credentials over plain http to {endpoint}: "
            'set s3AllowHttp to "true" to allow it'
        )
    if scheme not in ("http", "https"):
        raise errors.FailedPrecondition(f"S3 endpoint {endpoint!r} is not an http(s) URL")
    return endpoint


def make_s3_client(settings: VolumeSettings, secrets: VolumeSecrets) -> Any:
    """A boto3 S3 client for the volume's store, retrying in botocore's standard mode.

    Without an access key in ``secrets`` boto3's default credential chain applies
    (web identity, instance metadata).
    """
    # Imported here, not with the module: every role's process imports the controller
    # service, and boto3 is the slowest of the plugin's imports (seconds on a small
    # node), which each start of a node plugin would wait for.
    import boto3.session
    import botocore.config

    endpoint = check_endpoint(settings)
    config = botocore.config.Config(
        region_name=settings.s3_region or "us-east-1",
        retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores behind a custom endpoint rarely serve virtual hosts;
        # ZeroFS (object_store) also defaults to path style there.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=secrets.access_key_id,
        aws_secret_access_key=secrets.secret_access_key,
        aws_session_token=secrets.session_token,
        config=config,
    )


class _NoSuchBucket(Exception):
    pass


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Turn what botocore raises, once its own retries are spent, into a CsiError."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        metadata = exc.response.get("ResponseMetadata", {})
        status = metadata.get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise _NoSuchBucket from None
        detail = f"{code or 'error'} (HTTP {status})"
        if code in RETRYABLE_CODES or status == 429 or (status or 0) >= 500:
            attempts = metadata.get("RetryAttempts", 0) + 1
            raise errors.Unavailable(
                f"S3 {what} still failing after {attempts} attempts: {detail}"
            ) from None
        raise errors.Internal(f"S3 {what} failed: {detail}") from None
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
        raise errors.Unavailable(f"S3 {what} failed: {type(exc).__name__}") from None
    except botocore.exceptions.NoCredentialsError:
        raise errors.FailedPrecondition(
            f"S3 {what}: no credentials; put AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "in the provisioner secret"
        ) from None
    except botocore.exceptions.PaginationError:
        raise errors.Internal(
            f"S3 {what} returned the continuation token it had just returned"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise errors.Internal(f"S3 {what} failed: {type(exc).__name__}") from None


def _list_keys(client: Any, target: CleanupTarget) -> list[str]:
    """Every key under the prefix; FailedPrecondition if any key lies outside it.

    The whole listing is held before anything is deleted, so that a bad key on any
    page stops the call with nothing deleted. ZeroFS packs data into segment objects,
    so a volume lists to far fewer keys than it has blocks. A truncated page without a
    continuation token ends the listing early: the check after deleting then finds
    what was not listed.
    """
    keys: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=target.bucket,
        Prefix=target.prefix,
        PaginationConfig={"PageSize": LIST_PAGE_MAX},
    )
    with _s3_errors("ListObjectsV2"):
        for page in pages:
            for entry in page.get("Contents", []):
                key = entry.get("Key")
                if not isinstance(key, str) or not key.startswith(target.prefix):
                    raise errors.FailedPrecondition(
                        f"refusing to delete anything under {target}: the listing returned "
                        f"key {key!r}, which is outside the prefix"
                    )
                keys.append(key)
    return keys


def _batches(keys: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def _delete_batch(
    client: Any,
    target: CleanupTarget,
    batch: list[str],
    retry: KeyRetryPolicy,
    sleep: Callable[[float], None],
) -> int:
    """Delete one batch; retry keys that failed with a transient code. Returns the count."""
    pending = batch
    deleted = 0
    for attempt in range(1, retry.attempts + 1):
        with _s3_errors("DeleteObjects"):
            response = client.delete_objects(
                Bucket=target.bucket,
                Delete={"Objects": [{"Key": key} for key in pending], "Quiet": True},
            )
        failures = response.get("Errors") or []
        failed_keys = [failure.get("Key") for failure in failures]
        if not set(failed_keys) <= set(pending):
            raise errors.Internal(
                f"S3 DeleteObjects under {target} reported errors for keys it was not asked "
                "to delete"
            )
        deleted += len(pending) - len(set(failed_keys))
        if not failures:
            return deleted
        codes = sorted({str(failure.get("Code", "")) for failure in failures})
        summary = f"{len(failures)} of {len(pending)} keys failed ({', '.join(codes)})"
        if not set(codes) <= RETRYABLE_CODES:
            raise errors.Internal(f"S3 DeleteObjects under {target}: {summary}")
        if attempt == retry.attempts:
            raise errors.Unavailable(
                f"S3 DeleteObjects under {target} still failing after {retry.attempts} "
                f"attempts: {summary}"
            )
        log.info("S3 DeleteObjects under %s: %s, retrying them", target, summary)
        pending = [key for key in pending if key in set(failed_keys)]
        sleep(retry.delay(attempt))
    raise AssertionError("unreachable: the loop returns or raises")


def delete_volume_data(
    settings: VolumeSettings,
    volume_id: str,
    secrets: VolumeSecrets,
    *,
    client: Any = None,
    key_retry: KeyRetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Delete every object under the volume's prefix; return how many were deleted.

    ``client`` defaults to ``make_s3_client(settings, secrets)``. A missing bucket
    counts as nothing to delete. Raises FailedPrecondition when a guardrail refuses,
    UNAVAILABLE when S3 keeps failing or objects remain afterwards, INTERNAL for
    non-transient S3 errors; the caller must then fail DeleteVolume. ``key_retry`` and
    ``sleep`` pace the retries of keys a DeleteObjects answer reports as failed.
    """
    key_retry = key_retry or KeyRetryPolicy()
    target = cleanup_target(settings, volume_id)
    check_endpoint(settings)
    if client is None:
        client = make_s3_client(settings, secrets)
    try:
        keys = _list_keys(client, target)
    except _NoSuchBucket:
        log.warning("S3 bucket %r does not exist: nothing to delete for %s", target.bucket, target)
        return 0

    deleted = 0
    try:
        for batch in _batches(keys, DELETE_BATCH_MAX):
            deleted += _delete_batch(client, target, batch, key_retry, sleep)
            log.debug("deleted %d of %d objects under %s", deleted, len(keys), target)
        with _s3_errors("ListObjectsV2"):
            remaining = client.list_objects_v2(
                Bucket=target.bucket, Prefix=target.prefix, MaxKeys=1
            )
    except _NoSuchBucket:
        raise errors.Unavailable(f"S3 bucket vanished while deleting {target}") from None
    if remaining.get("KeyCount", len(remaining.get("Contents", []))):
        raise errors.Unavailable(
            f"objects remain under {target} after deleting {deleted}: is a ZeroFS server "
            "still writing to this volume?"
        )
    return deleted
