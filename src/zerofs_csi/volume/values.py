"""The value types of StorageClass parameters: each parser takes the stripped raw string
and returns the typed value or raises ``BadValue``, whose message says what was expected.
``settings`` names the key in the error it makes of it.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from decimal import Decimal


class BadValue(ValueError):
    """A value that does not parse; the message says what was expected."""


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
        raise BadValue(expected)
    # Imported here: the kubernetes package takes most of a second to import, and only
    # volumes with resource parameters need it.
    from kubernetes.utils.quantity import parse_quantity

    try:
        value: Decimal = parse_quantity(text)
    except (ValueError, ArithmeticError):
        raise BadValue(expected) from None
    if value > MAX_QUANTITY:
        raise BadValue(f"{expected}, at most {MAX_QUANTITY}")
    return value


# Value parsers: each takes the stripped raw string and raises BadValue.


def parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise BadValue('"true" or "false"')


def int_in(low: int, high: int) -> Callable[[str], int]:
    # No more digits than ``high`` has: int() of thousands of digits is slow, then refused.
    digits = re.compile(f"[0-9]{{1,{len(str(high))}}}")

    def parse(raw: str) -> int:
        if not digits.fullmatch(raw) or not low <= int(raw) <= high:
            raise BadValue(f"an integer from {low} to {high}")
        return int(raw)

    return parse


def gb_up_to(high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", raw):
            raise BadValue(f"a number of GB (decimal) greater than 0 and at most {high:g}")
        value = float(raw)
        if not 0 < value <= high:
            raise BadValue(f"a number of GB (decimal) greater than 0 and at most {high:g}")
        return value

    return parse


def has_control_or_space(raw: str) -> bool:
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


def parse_endpoint(raw: str) -> str:
    match = ENDPOINT.fullmatch(raw)
    if match is None or (match[2] is not None and not 0 < int(match[2]) < 65536):
        raise BadValue(ENDPOINT_EXPECTED)
    if match[1].startswith("["):
        try:
            ipaddress.IPv6Address(match[1][1:-1])
        except ValueError:
            raise BadValue(ENDPOINT_EXPECTED) from None
    return raw.removesuffix("/")


def parse_region(raw: str) -> str:
    if not REGION.fullmatch(raw):
        raise BadValue("a region name of letters, digits, '-' and '_' (such as us-east-1)")
    return raw


# An OCI image reference: [registry[:port]/]name[:tag][@sha256:digest].
IMAGE = re.compile(
    r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def parse_image(raw: str) -> str:
    if len(raw) > 255 or not IMAGE.fullmatch(raw):
        raise BadValue("a container image reference such as ghcr.io/barre/zerofs:2.3.0")
    return raw


def parse_compression(raw: str) -> str:
    match = re.fullmatch(r"zstd-([0-9]{1,2})", raw)
    if raw == "lz4" or (match is not None and 1 <= int(match[1]) <= 22):
        return raw
    raise BadValue("lz4 or zstd-N with N from 1 to 22")


def parse_rust_log(raw: str) -> str:
    # tracing-subscriber EnvFilter directives: target[=level], comma separated.
    if not re.fullmatch(r"[A-Za-z0-9_:=,.-]{1,256}", raw):
        raise BadValue("a RUST_LOG filter such as info or zerofs=debug,slatedb=info")
    return raw


def parse_redis_url(raw: str) -> str:
    expected = (
        "a redis:// or rediss:// URL with a host and no password (put a URL with a "
        "password in the CSI secret instead)"
    )
    try:
        url = urllib.parse.urlsplit(raw)
        _ = url.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise BadValue(expected) from exc
    if (
        url.scheme not in ("redis", "rediss")
        or not url.hostname
        or url.password is not None
        or "$" in raw
        or has_control_or_space(raw)
    ):
        raise BadValue(expected)
    return raw


def parse_quantity(raw: str) -> str:
    quantity_value(raw)
    return raw


def parse_dns_subdomain(raw: str) -> str:
    if len(raw) > 253 or not re.fullmatch(
        r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*", raw
    ):
        raise BadValue("a Kubernetes object name (DNS-1123 subdomain)")
    return raw
