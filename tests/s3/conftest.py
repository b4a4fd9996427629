"""Fixtures for tests against a real S3 server: Ceph radosgw started once per session."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from radosgw import RadosGateway, RadosGatewayUnavailable, ensure_installed  # noqa: E402

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


def s3_client_for(gateway: RadosGateway) -> Any:
    """A plain boto3 client used by the tests to seed and inspect the bucket."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=gateway.endpoint,
        aws_access_key_id=gateway.access_key,
        aws_secret_access_key=gateway.secret_key,
        region_name=gateway.region,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def s3(radosgw: RadosGateway) -> Any:
    return s3_client_for(radosgw)


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
