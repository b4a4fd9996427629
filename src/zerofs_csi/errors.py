"""Domain errors. Each carries the gRPC status code the interceptor answers with."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """Base of every error a CSI call may answer with; ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # A bounded label for metrics: a gRPC code name or an errno name, never free text.
        self.reason = reason or self.code.name


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Aborted(CsiError):
    code = grpc.StatusCode.ABORTED


class Unavailable(CsiError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(CsiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(CsiError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CsiError):
    code = grpc.StatusCode.INTERNAL


def of_code(name: str, message: str) -> CsiError:
    """The error of gRPC status code ``name`` (``NOT_FOUND``...) with ``message``; an
    unknown name is INTERNAL."""
    for kind in _subclasses(CsiError):
        if kind.code.name == name:
            return kind(message)
    return Internal(message)


def _subclasses(kind: type[CsiError]) -> list[type[CsiError]]:
    return [sub for direct in kind.__subclasses__() for sub in (direct, *_subclasses(direct))]
