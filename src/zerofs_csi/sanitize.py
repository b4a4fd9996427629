"""Keeping secrets out of logs.

Two layers: request dumps clear every field the CSI spec marks with the ``csi_secret``
field option, and a redactor remembers the secret values seen in requests and masks them
in any formatted log line, so that a secret echoed by a library error message is masked too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from zerofs_csi.csi import csi_pb2

MASK = "***stripped***"
# Values shorter than this are not masked: they would garble unrelated text ("1", "true").
_MIN_SECRET_LEN = 4


def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])  # type: ignore[index]


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def strip_secrets(message: Message) -> Message:
    """A copy of ``message`` with every csi_secret field's values masked."""
    clean = type(message)()
    clean.CopyFrom(message)
    _strip_in_place(clean)
    return clean


def _strip_in_place(message: Message) -> None:
    for field, value in message.ListFields():
        if _is_secret(field):
            if _is_map(field):
                for key in list(value):
                    value[key] = MASK
            elif field.type == FieldDescriptor.TYPE_STRING:
                setattr(message, field.name, MASK)
            else:
                message.ClearField(field.name)
        elif field.message_type is not None and not _is_map(field):
            items = value if field.is_repeated else [value]
            for item in items:
                _strip_in_place(item)


def secret_values(message: Message) -> list[str]:
    """Every value held in a csi_secret field of ``message`` (recursively)."""
    found: list[str] = []
    for field, value in message.ListFields():
        if _is_secret(field):
            if _is_map(field):
                found.extend(str(v) for v in value.values())
            elif isinstance(value, str):
                found.append(value)
        elif field.message_type is not None and not _is_map(field):
            items = value if field.is_repeated else [value]
            for item in items:
                found.extend(secret_values(item))
    return found


def describe(message: Message) -> str:
    """One-line text form of a request with its secrets stripped, for debug logs."""
    return text_format.MessageToString(strip_secrets(message), as_one_line=True)


class SecretRedactor:
    """Remembers recent secret values and masks them in formatted log output."""

    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._values: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def remember(self, values: list[str] | tuple[str, ...]) -> None:
        with self._lock:
            for value in values:
                if len(value) < _MIN_SECRET_LEN:
                    continue
                self._values[value] = None
                self._values.move_to_end(value)
            while len(self._values) > self._capacity:
                self._values.popitem(last=False)

    def redact(self, text: str) -> str:
        with self._lock:
            values = list(self._values)
        # Longest first so that a secret containing another is masked whole.
        for value in sorted(values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and masks remembered secrets in everything it produces."""

    def __init__(self, inner: logging.Formatter, redactor: SecretRedactor) -> None:
        super().__init__()
        self._inner = inner
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.redact(self._inner.format(record))


# The process-wide redactor: log handlers are process-wide too.
REDACTOR = SecretRedactor()
