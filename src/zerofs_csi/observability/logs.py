"""Structured logging: one JSON object (or one readable line) per event."""

from __future__ import annotations

import json
import logging
import sys
import time

from zerofs_csi.config import LogFormat
from zerofs_csi.observability.sanitize import REDACTOR, SecretRedactor

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is a field.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields a caller attached with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class _RedactingFormatter(logging.Formatter):
    """Masks remembered secrets in the message, the fields and the traceback of a record
    before a subclass encodes them: once encoded, a secret may be escaped beyond
    recognition (a quote, a backslash or a non-ASCII letter in JSON)."""

    def __init__(self, redactor: SecretRedactor = REDACTOR) -> None:
        super().__init__()
        self._redactor = redactor

    def message(self, record: logging.LogRecord) -> str:
        return self._redactor.redact(record.getMessage())

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        redact = self._redactor.redact_value
        return {k: redact(v) for k, v in record_fields(record).items()}

    def traceback(self, record: logging.LogRecord) -> str | None:
        if not record.exc_info:
            return None
        return self._redactor.redact(self.formatException(record.exc_info))


class JsonFormatter(_RedactingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self.message(record),
        }
        entry.update(self.fields(record))
        traceback = self.traceback(record)
        if traceback is not None:
            entry["traceback"] = traceback
        return json.dumps(entry, separators=(",", ":"))


class TextFormatter(_RedactingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in self.fields(record).items())
        line = (
            f"{self.formatTime(record, '%H:%M:%S')}.{int(record.msecs):03d} "
            f"{record.levelname:<7} {record.name}: {self.message(record)}"
        )
        if fields:
            line = f"{line} [{fields}]"
        traceback = self.traceback(record)
        if traceback is not None:
            line = f"{line}\n{traceback}"
        return line


def configure(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
