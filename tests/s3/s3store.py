"""What the S3 tests need of a store they run against (radosgw.py, minio.py)."""

from __future__ import annotations

from typing import Protocol


class S3Store(Protocol):
    endpoint: str
    access_key: str
    secret_key: str
    region: str
