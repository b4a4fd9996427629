"""The base storage URL of a StorageClass, and the S3 names a volume gets from it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from zerofs_csi.volume.id import validate_volume_id
from zerofs_csi.volume.values import BadValue

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
            raise BadValue("a URL such as s3://bucket/path")
        if scheme == "memory":
            if rest not in ("", "/"):
                raise BadValue("memory:// with no bucket or path")
            return cls(scheme="memory", bucket="", path="")
        if scheme == "file":
            # A directory on the server's host used as the object store (local backend).
            if not rest.startswith("/") or rest.rstrip("/") == "":
                raise BadValue("file:///absolute/directory (not the root directory)")
            path = rest.strip("/")
            for segment in path.split("/"):
                if not KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
                    raise BadValue(
                        "file:///absolute/directory made of letters, digits, '.', '_' and '-' "
                        "segments (no '..', '//' or other characters)"
                    )
            return cls(scheme="file", bucket="", path=path)
        if scheme not in _S3_SCHEMES:
            raise BadValue("an s3:// or s3a:// URL (or file:// with the local backend)")
        bucket, _, path = rest.partition("/")
        if not BUCKET.fullmatch(bucket) or ".." in bucket:
            raise BadValue(
                "s3://BUCKET[/path] with an S3 bucket name (3-63 characters: lowercase "
                "letters, digits, '.', '-'; a letter or digit first and last; no '..')"
            )
        path = path.removesuffix("/")
        if path:
            for segment in path.split("/"):
                if not KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
                    raise BadValue(
                        "a path of non-empty segments of letters, digits, '.', '_' and '-' "
                        "(no '..', '//', '*' or other characters)"
                    )
        if len(path) > 512:
            raise BadValue("a path of at most 512 characters")
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
