"""What the S3 tests need of a store they run against (radosgw.py, minio.py), and a
client of it."""

from __future__ import annotations

from typing import Any, Protocol

import boto3
import botocore.config


class S3Store(Protocol):
    endpoint: str
    access_key: str
    secret_key: str
    region: str


def client_of(store: S3Store) -> Any:
    """A plain boto3 client of the store's root user, path-style as the servers here
    need, to seed and inspect buckets."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=store.endpoint,
        aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key,
        region_name=store.region,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
