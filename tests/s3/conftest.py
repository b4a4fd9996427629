"""Fixtures for tests against real S3 servers, each started once per session: Ceph
radosgw, a distributed MinIO set and a single MinIO server (only for the tests that ask
for them)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minio import MinioSet, MinioUnavailable, check_runnable  # noqa: E402
from minio_server import MinioServer  # noqa: E402
from radosgw import RadosGateway, RadosGatewayUnavailable, ensure_installed  # noqa: E402
from s3store import S3Store, client_of  # noqa: E402

_STARTUP_REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _STARTUP_REPORT:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def radosgw() -> Iterator[RadosGateway]:
    try:
        ensure_installed()
    except RadosGatewayUnavailable as exc:
        pytest.skip(str(exc))
    gateway = RadosGateway(Path(tempfile.mkdtemp(prefix="zerofs-csi-rgw-")))
    try:
        gateway.start()
    except BaseException:
        gateway.stop()
        raise
    _STARTUP_REPORT.append(
        f"radosgw (Ceph {gateway.ceph_version}) started in {gateway.startup_seconds:.1f} s "
        f"at {gateway.endpoint}"
    )
    try:
        yield gateway
    finally:
        gateway.stop()


# The bucket of ``one_minio``.
ONE_MINIO_BUCKET = "volumes"


@pytest.fixture(scope="session")
def one_minio() -> Iterator[MinioServer]:
    """One MinIO server on loopback with the bucket ``volumes``: a store with the
    conditional writes a real ZeroFS needs (MINIO_BIN, which make minio builds)."""
    binary = os.environ.get("MINIO_BIN")
    if not binary:
        pytest.skip("MINIO_BIN is not set: make minio builds MinIO")
    server = MinioServer(Path(tempfile.mkdtemp(prefix="zerofs-csi-minio-")), Path(binary))
    server.start()
    server.make_bucket(ONE_MINIO_BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def minio() -> Iterator[MinioSet]:
    """Two MinIO servers with two drives each, each in a network namespace of its own
    (tests/s3/minio.py); the binary is the one make minio builds (MINIO_BIN)."""
    binary = os.environ.get("MINIO_BIN")
    if not binary:
        pytest.skip("MINIO_BIN is not set: make test-s3 builds MinIO (make minio) and sets it")
    try:
        check_runnable(Path(binary))
    except MinioUnavailable as exc:
        pytest.skip(str(exc))
    minio_set = MinioSet(Path(tempfile.mkdtemp(prefix="zerofs-csi-minio-")), Path(binary))
    try:
        minio_set.start()
    except BaseException:
        minio_set.stop()
        raise
    _STARTUP_REPORT.append(
        f"MinIO ({minio_set.version}) set of 2 servers x 2 drives started in "
        f"{minio_set.startup_seconds:.1f} s at {minio_set.endpoint}"
    )
    try:
        yield minio_set
    finally:
        minio_set.stop()


@pytest.fixture
def store(radosgw: RadosGateway) -> S3Store:
    """The store the s3 and bucket fixtures use; a test module overrides it to run its
    tests against others too."""
    return radosgw


def s3_client_for(store: S3Store) -> Any:
    """A plain boto3 client used by the tests to seed and inspect the bucket."""
    return client_of(store)


@pytest.fixture
def s3(store: S3Store) -> Any:
    return s3_client_for(store)


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket for one test, emptied and removed afterwards."""
    name = "t-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:50]
    name = name.rstrip("-") + f"-{abs(hash(request.node.nodeid)) % 10**6}"
    s3.create_bucket(Bucket=name)
    yield name
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": entry["Key"]} for entry in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=name)
