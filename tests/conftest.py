"""Shared test configuration: the ``privileged`` marker skips where NBD cannot be used."""

from __future__ import annotations

import os

import pytest


def nbd_unavailable_reason() -> str | None:
    """Why the kernel NBD path cannot be exercised here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) for NBD"
    try:
        fd = os.open("/dev/nbd0", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return (
            f"/dev/nbd0 cannot be opened ({exc.strerror}): no kernel NBD here; run `make test-vm`"
        )
    os.close(fd)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = nbd_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)
