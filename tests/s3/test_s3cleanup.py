"""deleteDataOnPVCDelete against real S3 servers, plus its guardrails.

The tests that talk to a store run against Ceph radosgw and against the distributed
MinIO set (tests/s3/minio.py); the last ones kill one of the set's servers, or cut it
off, in the middle of a delete.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from minio import SERVERS, MinioSet
from radosgw import RadosGateway
from s3relay import Refusal, S3Relay, s3_relay
from s3store import S3Store

from zerofs_csi import errors
from zerofs_csi.bench.plugin import free_tcp_port
from zerofs_csi.controller.s3cleanup import (
    DELETE_BATCH_MAX,
    S3_MAX_ATTEMPTS,
    KeyRetryPolicy,
    check_prefix,
    delete_volume_data,
    make_s3_client,
)
from zerofs_csi.volume.secrets import VolumeSecrets
from zerofs_csi.volume.settings import VolumeSettings
from zerofs_csi.volume.storage_url import StorageUrl

VOLUME = "pvc-1"
# Fast retries of failed keys so that the tests of their exhaustion stay short.
FAST = KeyRetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)

# Objects that must survive deleting pvc-1 under base path "base": a sibling volume
# whose id extends ours, an object named exactly like the prefix without its '/',
# the same id under another base path, and objects at the bucket root.
BYSTANDERS = [
    "base/pvc-10/data/000001.sst",
    "base/pvc-10/manifest",
    "base/pvc-1",
    "base/pvc-1x/manifest",
    "base/pvc-2/manifest",
    "other/pvc-1/manifest",
    "pvc-1/manifest",
    "root-object",
    "base/manifest",
]


# MinIO keeps each object as a directory on its drives: it accepts an object named like
# the prefix of others ("base/pvc-1" beside "base/pvc-1/manifest"), which then hides
# every object under that prefix from listings, so that nothing can be found to delete.
# No ZeroFS volume writes such a key; the tests leave it out on MinIO.
HIDES_THE_VOLUME_ON_MINIO = "base/pvc-1"


@pytest.fixture
def bystanders(store: S3Store) -> list[str]:
    if isinstance(store, MinioSet):
        return [key for key in BYSTANDERS if key != HIDES_THE_VOLUME_ON_MINIO]
    return BYSTANDERS


def secrets_for(store: S3Store) -> VolumeSecrets:
    return VolumeSecrets(
        encryption_password="unused-here",
        access_key_id=store.access_key,
        secret_access_key=store.secret_key,
    )


def settings_for(store: S3Store, bucket: str, path: str = "base") -> VolumeSettings:
    return VolumeSettings(
        storage_url=StorageUrl("s3", bucket, path),
        s3_endpoint=store.endpoint,
        s3_allow_http=True,
        s3_region=store.region,
        delete_data_on_pvc_delete=True,
    )


def put_all(s3: Any, bucket: str, keys: list[str]) -> None:
    def put(key: str) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, keys))


def all_keys(s3: Any, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(entry["Key"] for entry in page.get("Contents", []))
    return keys


def volume_keys(count: int, prefix: str = "base/pvc-1/") -> list[str]:
    return [f"{prefix}segments/{n:06d}" for n in range(count - 2)] + [
        f"{prefix}manifest",
        f"{prefix}.nbd/disk",
    ]


class CallLog:
    """Counts S3 operations a client sends, and DeleteObjects batch sizes."""

    def __init__(self, client: Any) -> None:
        self.operations: list[str] = []
        self.batch_sizes: list[int] = []
        client.meta.events.register("before-send.s3", self._on_send)
        client.meta.events.register("before-parameter-build.s3.DeleteObjects", self._on_delete)

    def _on_send(self, request: Any, **kwargs: Any) -> None:
        self.operations.append(kwargs["event_name"].rsplit(".", 1)[-1])

    def _on_delete(self, params: dict[str, Any], **kwargs: Any) -> None:
        self.batch_sizes.append(len(params["Delete"]["Objects"]))


@pytest.fixture(params=["radosgw", "minio"])
def store(request: pytest.FixtureRequest) -> S3Store:
    """Every test here that talks to a store runs against radosgw and the MinIO set."""
    chosen: S3Store = request.getfixturevalue(request.param)
    return chosen


@pytest.fixture
def relay(store: S3Store) -> Iterator[S3Relay]:
    with s3_relay(store.endpoint) as relay:
        yield relay


def through(relay: S3Relay, settings: VolumeSettings) -> VolumeSettings:
    return dataclasses.replace(settings, s3_endpoint=relay.endpoint)


# --------------------------------------------------------------------- happy paths


@pytest.mark.s3
def test_deletes_only_the_volume_objects_across_pages_and_batches(
    store: S3Store, s3: Any, bucket: str, bystanders: list[str]
) -> None:
    mine = volume_keys(DELETE_BATCH_MAX + 50)
    put_all(s3, bucket, mine + bystanders)
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))
    calls = CallLog(client)

    deleted = delete_volume_data(
        settings_for(store, bucket), VOLUME, secrets_for(store), client=client
    )

    assert deleted == len(mine)
    assert all_keys(s3, bucket) == set(bystanders)
    assert calls.batch_sizes == [DELETE_BATCH_MAX, 50]
    # Two listing pages, two delete batches, one final check that nothing remains.
    assert calls.operations == [
        "ListObjectsV2",
        "ListObjectsV2",
        "DeleteObjects",
        "DeleteObjects",
        "ListObjectsV2",
    ]


@pytest.mark.s3
def test_storage_url_at_the_bucket_root(
    store: S3Store, s3: Any, bucket: str, bystanders: list[str]
) -> None:
    put_all(s3, bucket, volume_keys(5, "pvc-1/") + bystanders)
    settings = settings_for(store, bucket, path="")
    deleted = delete_volume_data(settings, VOLUME, secrets_for(store))
    # "pvc-1/manifest" is both a bystander of the "base" layout and one of ours here.
    assert deleted == 5
    assert all_keys(s3, bucket) == set(bystanders) - {"pvc-1/manifest"}


@pytest.mark.s3
def test_second_delete_finds_nothing(
    store: S3Store, s3: Any, bucket: str, bystanders: list[str]
) -> None:
    put_all(s3, bucket, volume_keys(3) + bystanders)
    settings = settings_for(store, bucket)
    assert delete_volume_data(settings, VOLUME, secrets_for(store)) == 3
    assert delete_volume_data(settings, VOLUME, secrets_for(store)) == 0
    assert all_keys(s3, bucket) == set(bystanders)


@pytest.mark.s3
def test_missing_bucket_means_nothing_to_delete(store: S3Store) -> None:
    settings = settings_for(store, "no-such-bucket-zerofs")
    assert delete_volume_data(settings, VOLUME, secrets_for(store)) == 0


# --------------------------------------------------------------------- guardrails


@pytest.mark.parametrize(
    ("prefix", "volume_id", "reason"),
    [
        ("", "pvc-1", "empty or the bucket root"),
        ("/", "pvc-1", "empty or the bucket root"),
        ("//", "pvc-1", "empty or the bucket root"),
        ("base/pvc-1", "pvc-1", "must end with '/'"),
        ("base/pvc-10/", "pvc-1", "does not end with the volume id"),
        ("base/xpvc-1/", "pvc-1", "does not end with the volume id"),
        ("base/", "pvc-1", "does not end with the volume id"),
        ("base/*/pvc-1/", "pvc-1", "wildcard"),
        ("base?/pvc-1/", "pvc-1", "wildcard"),
        ("base//pvc-1/", "pvc-1", "empty segment"),
        ("/pvc-1/", "pvc-1", "empty segment"),
        ("../pvc-1/", "pvc-1", "'..'"),
        ("a/../pvc-1/", "pvc-1", "'..'"),
        ("a/./pvc-1/", "pvc-1", "'..'"),
        ("a\n/pvc-1/", "pvc-1", "control character"),
    ],
)
def test_check_prefix_refusals(prefix: str, volume_id: str, reason: str) -> None:
    with pytest.raises(errors.FailedPrecondition) as info:
        check_prefix(prefix, volume_id)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert reason in info.value.message


@pytest.mark.parametrize(("prefix", "volume_id"), [("pvc-1/", "pvc-1"), ("a/b/pvc-1/", "pvc-1")])
def test_check_prefix_accepts(prefix: str, volume_id: str) -> None:
    check_prefix(prefix, volume_id)


def _bad_path(path: str) -> Callable[[VolumeSettings], VolumeSettings]:
    return lambda s: dataclasses.replace(
        s, storage_url=StorageUrl("s3", s.storage_url.bucket, path)
    )


# Settings built directly (bypassing parsing), each of which a guardrail must refuse.
REFUSALS: list[tuple[str, Callable[[VolumeSettings], VolumeSettings], str, type]] = [
    ("dotdot", _bad_path("base/../base"), VOLUME, errors.FailedPrecondition),
    ("dot", _bad_path("./base"), VOLUME, errors.FailedPrecondition),
    ("star", _bad_path("base/*"), VOLUME, errors.FailedPrecondition),
    ("empty-segment", _bad_path("base//x"), VOLUME, errors.FailedPrecondition),
    ("leading-slash", _bad_path("/base"), VOLUME, errors.FailedPrecondition),
    ("trailing-slash", _bad_path("base/"), VOLUME, errors.FailedPrecondition),
    (
        "bad-bucket",
        lambda s: dataclasses.replace(s, storage_url=StorageUrl("s3", "", "base")),
        VOLUME,
        errors.FailedPrecondition,
    ),
    (
        "memory-store",
        lambda s: dataclasses.replace(s, storage_url=StorageUrl("memory", "", "")),
        VOLUME,
        errors.FailedPrecondition,
    ),
    ("plain-http", lambda s: dataclasses.replace(s, s3_allow_http=False), VOLUME,
     errors.FailedPrecondition),
    ("volume-id-traversal", lambda s: s, "../pvc-1", errors.InvalidArgument),
    ("volume-id-empty", lambda s: s, "", errors.InvalidArgument),
    ("volume-id-slash", lambda s: s, "pvc-1/..", errors.InvalidArgument),
    ("volume-id-star", lambda s: s, "*", errors.InvalidArgument),
]  # fmt: skip


@pytest.mark.s3
@pytest.mark.parametrize(
    ("case", "mutate", "volume_id", "error"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_every_refusal_deletes_nothing_and_sends_nothing(
    store: S3Store,
    s3: Any,
    bucket: str,
    bystanders: list[str],
    case: str,
    mutate: Callable[[VolumeSettings], VolumeSettings],
    volume_id: str,
    error: type,
) -> None:
    everything = volume_keys(4) + ["base/base/pvc-1/x", "base/x/pvc-1/y"] + bystanders
    put_all(s3, bucket, everything)
    settings = mutate(settings_for(store, bucket))
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))
    calls = CallLog(client)
    with pytest.raises(error) as info:
        delete_volume_data(settings, volume_id, secrets_for(store), client=client)
    assert info.value.message
    assert calls.operations == []
    assert all_keys(s3, bucket) == set(everything)


@pytest.mark.s3
def test_plain_http_is_refused_unless_allowed(store: S3Store, s3: Any, bucket: str) -> None:
    put_all(s3, bucket, volume_keys(3))
    refused = dataclasses.replace(settings_for(store, bucket), s3_allow_http=False)
    with pytest.raises(errors.FailedPrecondition, match="plain http"):
        delete_volume_data(refused, VOLUME, secrets_for(store))
    with pytest.raises(errors.FailedPrecondition, match="plain http"):
        make_s3_client(refused, secrets_for(store))
    assert len(all_keys(s3, bucket)) == 3
    allowed = settings_for(store, bucket)
    assert delete_volume_data(allowed, VOLUME, secrets_for(store)) == 3


@pytest.mark.s3
def test_a_listed_key_outside_the_prefix_aborts_before_any_delete(
    store: S3Store, s3: Any, bucket: str, bystanders: list[str]
) -> None:
    mine = volume_keys(DELETE_BATCH_MAX + 10)
    put_all(s3, bucket, mine + bystanders)
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))
    calls = CallLog(client)
    pages = 0

    def inject_foreign_key(parsed: dict[str, Any], **kwargs: Any) -> None:
        # On the second page, so the first page's keys were already collected.
        nonlocal pages
        pages += 1
        if pages == 2:
            parsed.setdefault("Contents", []).append({"Key": "base/pvc-10/manifest"})

    client.meta.events.register("after-call.s3.ListObjectsV2", inject_foreign_key)
    with pytest.raises(errors.FailedPrecondition, match="outside the prefix"):
        delete_volume_data(settings_for(store, bucket), VOLUME, secrets_for(store), client=client)
    assert "DeleteObjects" not in calls.operations
    assert all_keys(s3, bucket) == set(mine + bystanders)


# --------------------------------------------------------------------- failures and retries


@pytest.mark.s3
def test_throttled_requests_are_retried(
    store: S3Store, s3: Any, bucket: str, bystanders: list[str], relay: S3Relay
) -> None:
    mine = volume_keys(20)
    put_all(s3, bucket, mine + bystanders)
    relay.refuse(Refusal("GET", "list-type", 503, "SlowDown", times=1))
    relay.refuse(Refusal("POST", "delete", 503, "SlowDown", times=2))

    deleted = delete_volume_data(
        through(relay, settings_for(store, bucket)), VOLUME, secrets_for(store)
    )

    assert deleted == len(mine)
    # The listing, then the final check that nothing remains.
    assert relay.statuses("GET", "list-type") == [503, 200, 200]
    assert relay.statuses("POST", "delete") == [503, 503, 200]
    assert all_keys(s3, bucket) == set(bystanders)


@pytest.mark.s3
def test_endless_server_errors_fail_retryably_and_delete_nothing(
    store: S3Store, s3: Any, bucket: str, relay: S3Relay
) -> None:
    mine = volume_keys(10)
    put_all(s3, bucket, mine)
    relay.refuse(Refusal("POST", "delete", 503, "ServiceUnavailable"))
    with pytest.raises(errors.Unavailable) as info:
        delete_volume_data(through(relay, settings_for(store, bucket)), VOLUME, secrets_for(store))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.message == (
        f"S3 DeleteObjects still failing after {S3_MAX_ATTEMPTS} attempts: "
        "ServiceUnavailable (HTTP 503)"
    )
    assert relay.statuses("POST", "delete") == [503] * S3_MAX_ATTEMPTS
    assert all_keys(s3, bucket) == set(mine)


@pytest.mark.s3
def test_a_repeated_continuation_token_stops_the_listing_before_any_delete(
    store: S3Store, s3: Any, bucket: str
) -> None:
    mine = volume_keys(DELETE_BATCH_MAX + 10)
    put_all(s3, bucket, mine)
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))
    calls = CallLog(client)
    tokens: list[str] = []

    def repeat_the_first_token(parsed: dict[str, Any], **kwargs: Any) -> None:
        # The second (last) page claims more to come under the token of the first.
        if parsed.get("NextContinuationToken"):
            tokens.append(parsed["NextContinuationToken"])
        elif tokens:
            parsed["IsTruncated"] = True
            parsed["NextContinuationToken"] = tokens[0]

    client.meta.events.register("after-call.s3.ListObjectsV2", repeat_the_first_token)
    with pytest.raises(errors.Internal, match="continuation token"):
        delete_volume_data(settings_for(store, bucket), VOLUME, secrets_for(store), client=client)
    assert calls.operations == ["ListObjectsV2", "ListObjectsV2"]
    assert all_keys(s3, bucket) == set(mine)


@pytest.mark.s3
@pytest.mark.parametrize(
    ("code", "times", "outcome"),
    [
        ("InternalError", 1, None),  # transient per-key failure: retried, then success
        ("SlowDown", FAST.attempts, errors.Unavailable),  # never clears: retryable failure
        # MinIO's answer for a key while its set lacks write quorum, as for seconds after
        # a server that was down for a while is back.
        ("SlowDownWrite", FAST.attempts, errors.Unavailable),
        ("AccessDenied", 1, errors.Internal),  # not transient: fails at once
    ],
)
def test_per_key_errors_are_failures(
    store: S3Store,
    s3: Any,
    bucket: str,
    code: str,
    times: int,
    outcome: type | None,
) -> None:
    mine = volume_keys(8)
    put_all(s3, bucket, mine)
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))
    injected = 0
    retried_batches: list[int] = []

    def report_one_key_failed(parsed: dict[str, Any], **kwargs: Any) -> None:
        nonlocal injected
        if injected < times:
            injected += 1
            parsed["Errors"] = [{"Key": "base/pvc-1/manifest", "Code": code, "Message": "x"}]

    def record_batch(params: dict[str, Any], **kwargs: Any) -> None:
        retried_batches.append(len(params["Delete"]["Objects"]))

    client.meta.events.register("after-call.s3.DeleteObjects", report_one_key_failed)
    client.meta.events.register("before-parameter-build.s3.DeleteObjects", record_batch)
    call = dict(client=client, key_retry=FAST, sleep=lambda seconds: None)
    if outcome is None:
        assert delete_volume_data(
            settings_for(store, bucket), VOLUME, secrets_for(store), **call
        ) == len(mine)
        assert retried_batches == [len(mine), 1]  # only the failed key is sent again
        assert all_keys(s3, bucket) == set()
    else:
        with pytest.raises(outcome) as info:
            delete_volume_data(settings_for(store, bucket), VOLUME, secrets_for(store), **call)
        assert code in info.value.message


@pytest.mark.s3
def test_objects_written_during_deletion_keep_delete_failing(
    store: S3Store, s3: Any, bucket: str
) -> None:
    put_all(s3, bucket, volume_keys(5))
    client = make_s3_client(settings_for(store, bucket), secrets_for(store))

    def late_writer(**kwargs: Any) -> None:
        s3.put_object(Bucket=bucket, Key="base/pvc-1/segments/late", Body=b"late")

    client.meta.events.register("after-call.s3.DeleteObjects", late_writer)
    with pytest.raises(errors.Unavailable, match="objects remain"):
        delete_volume_data(settings_for(store, bucket), VOLUME, secrets_for(store), client=client)


@pytest.mark.s3
def test_unreachable_endpoint_is_unavailable(radosgw: RadosGateway) -> None:
    closed = f"http://127.0.0.1:{free_tcp_port()}"
    settings = dataclasses.replace(settings_for(radosgw, "any-bucket"), s3_endpoint=closed)
    client = make_s3_client(settings, secrets_for(radosgw))
    calls = CallLog(client)
    with pytest.raises(errors.Unavailable, match="EndpointConnectionError"):
        delete_volume_data(settings, VOLUME, secrets_for(radosgw), client=client)
    assert calls.operations == ["ListObjectsV2"] * S3_MAX_ATTEMPTS


@pytest.mark.s3
def test_rejected_credentials_fail_at_once_without_showing_them(
    store: S3Store, s3: Any, bucket: str, relay: S3Relay
) -> None:
    put_all(s3, bucket, volume_keys(3))
    wrong = VolumeSecrets(
        encryption_password="pw",
        access_key_id=store.access_key,
        secret_access_key="wrong-secret-value-" + store.secret_key[:4],
    )
    with pytest.raises(errors.Internal) as info:
        delete_volume_data(through(relay, settings_for(store, bucket)), VOLUME, wrong)
    assert "SignatureDoesNotMatch" in info.value.message or "403" in info.value.message
    assert wrong.secret_access_key not in info.value.message
    assert store.access_key not in info.value.message
    assert relay.statuses("GET", "list-type") == [403]  # not retried
    assert len(all_keys(s3, bucket)) == 3


# --------------------------------------------------------------------- a MinIO server lost

# How long a lost server stays away: the delete in flight waits for it (MinIO's write
# locks need both servers of a two-server set), well inside the driver's 60 s read
# timeout, so that the call can finish once the set heals.
OUTAGE_S = 5.0
# A fault and its undoing, as MinioSet methods.
FAULTS = {"kill": ("kill", "restart"), "cut-off": ("cut_off", "restore")}
# How long DeleteVolume is retried after the set has healed: MinIO answered SlowDownWrite
# for up to 22 s after its health check already passed.
RETRY_WITHIN_S = 60.0


def heal(minio: MinioSet) -> None:
    """Bring every server back and wait for write quorum, for the tests after this one."""
    for server in SERVERS:
        minio.restore(server)
        if not minio.running(server):
            minio.restart(server)
    minio.wait_healthy()


def delete_until_done(
    settings: VolumeSettings, secrets: VolumeSecrets, client: Any = None
) -> list[str]:
    """delete_volume_data called as the provisioner calls DeleteVolume: again after a
    pause while it fails UNAVAILABLE (any other error fails the test), until it succeeds.
    ``client`` serves the first call only. Returns the failed calls' messages."""
    deadline = time.monotonic() + RETRY_WITHIN_S
    failures: list[str] = []
    while True:
        try:
            delete_volume_data(settings, VOLUME, secrets, client=client)
        except errors.Unavailable as exc:
            failures.append(exc.message)
            if time.monotonic() > deadline:
                raise
            client = None
            time.sleep(2)
        else:
            return failures


def two_batches_to_delete(
    minio: MinioSet, s3: Any, bucket: str, bystanders: list[str]
) -> tuple[VolumeSettings, Any, CallLog]:
    """A volume of two DeleteObjects batches beside the bystanders; its settings, a
    client for the driver's delete and the log of that client's calls."""
    put_all(s3, bucket, volume_keys(DELETE_BATCH_MAX + 50) + bystanders)
    settings = settings_for(minio, bucket)
    client = make_s3_client(settings, secrets_for(minio))
    return settings, client, CallLog(client)


@pytest.mark.s3
@pytest.mark.parametrize("store", ["minio"], indirect=True)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_server_lost_mid_delete_holds_the_delete_until_the_set_heals(
    minio: MinioSet, s3: Any, bucket: str, bystanders: list[str], fault: str
) -> None:
    settings, client, calls = two_batches_to_delete(minio, s3, bucket, bystanders)
    lose, bring_back = (getattr(minio, name) for name in FAULTS[fault])
    timeline: dict[str, float] = {}

    def bring_back_b() -> None:
        bring_back("b")
        timeline["back"] = time.monotonic()

    returning = threading.Timer(OUTAGE_S, bring_back_b)

    def lose_b_after_the_first_batch(**kwargs: Any) -> None:
        if "lost" not in timeline:
            lose("b")
            timeline["lost"] = time.monotonic()
            returning.start()

    client.meta.events.register("after-call.s3.DeleteObjects", lose_b_after_the_first_batch)
    try:
        delete_until_done(settings, secrets_for(minio), client)
        finished = time.monotonic()
    finally:
        if "lost" in timeline:
            returning.join()
        heal(minio)

    # The second batch was sent with server b gone, and done only once it was back.
    assert calls.batch_sizes[:2] == [DELETE_BATCH_MAX, 50]
    assert finished > timeline["back"]
    assert all_keys(s3, bucket) == set(bystanders)


@pytest.mark.s3
@pytest.mark.parametrize("store", ["minio"], indirect=True)
def test_the_endpoint_server_killed_mid_delete_fails_retryably_and_a_retry_finishes(
    minio: MinioSet, s3: Any, bucket: str, bystanders: list[str]
) -> None:
    settings, client, calls = two_batches_to_delete(minio, s3, bucket, bystanders)

    def kill_a_after_the_first_batch(**kwargs: Any) -> None:
        if minio.running("a"):
            minio.kill("a")

    client.meta.events.register("after-call.s3.DeleteObjects", kill_a_after_the_first_batch)
    try:
        with pytest.raises(errors.Unavailable, match="EndpointConnectionError"):
            delete_volume_data(settings, VOLUME, secrets_for(minio), client=client)
        # botocore sent the second batch S3_MAX_ATTEMPTS times to the dead server.
        assert calls.operations[-S3_MAX_ATTEMPTS:] == ["DeleteObjects"] * S3_MAX_ATTEMPTS
    finally:
        heal(minio)

    # The first batch (the listing's first keys) is gone, the second untouched.
    mine = volume_keys(DELETE_BATCH_MAX + 50)
    assert all_keys(s3, bucket) == set(sorted(mine)[DELETE_BATCH_MAX:] + bystanders)
    # The provisioner's retries, once the set has healed, delete what is left.
    delete_until_done(settings, secrets_for(minio))
    assert all_keys(s3, bucket) == set(bystanders)
