"""Keeping secrets out of logs, and foreign text safe where it leaves the plugin.

Two layers keep secrets out: request dumps clear every field the CSI spec marks with the
``csi_secret`` field option, and a redactor remembers the secret values seen in requests
and masks them in every value a log line carries, before the line is encoded, so that a
secret echoed by a library error message is masked too.

Error text from servers (NBD error replies, a server's log) reaches gRPC statuses and
Kubernetes Events; :func:`printable` makes it one bounded line first.
"""

from __future__ import annotations

import re
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
    """Remembers recent secret values and masks them in text."""

    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._values: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._pattern: re.Pattern[str] | None = None

    def remember(self, values: list[str] | tuple[str, ...]) -> None:
        with self._lock:
            added = False
            for value in values:
                if len(value) < _MIN_SECRET_LEN:
                    continue
                added = added or value not in self._values
                self._values[value] = None
                self._values.move_to_end(value)
            while len(self._values) > self._capacity:
                self._values.popitem(last=False)
            if added:
                # Longest first, so that a secret containing another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(map(re.escape, ordered)))

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)

    def redact_value(self, value: object) -> object:
        """A value for a structured log entry with its secrets masked: strings masked,
        lists, tuples and dicts walked, numbers, booleans and None kept, and anything
        else masked in its ``str``."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, int | float):
            return value
        if isinstance(value, dict):
            return {str(k): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_value(v) for v in value]
        return self.redact(str(value))


# The process-wide redactor: log handlers are process-wide too.
REDACTOR = SecretRedactor()


def printable(text: str, max_bytes: int) -> str:
    """``text`` as one line of printable characters, at most ``max_bytes`` UTF-8 bytes.

    Control and other non-printable characters (newlines, ANSI escapes, bidirectional
    overrides) are written as Python writes them in a string literal (``\\n``,
    ``\\x1b``, ``\\u202e``), so text from a server can neither start a line of its own
    in a log or an Event nor drive a terminal. Too long a text loses its middle: the
    start says what failed, the end holds a server's last words.
    """
    if len(text) <= max_bytes:
        escaped = _escape(text)
        if len(escaped.encode()) <= max_bytes:
            return escaped
    # Every character escapes to at least one byte: no more than ``room`` characters
    # of either end can be kept.
    room = max_bytes - len(_ELISION)
    head = _escape(text[:room]).encode()[: room - room // 2]
    tail = _escape(text[-room:]).encode()
    tail = tail[len(tail) - room // 2 :]
    # A cut through a multibyte character drops that character.
    return head.decode(errors="ignore") + _ELISION + tail.decode(errors="ignore")


_ELISION = " [...] "


def _escape(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
