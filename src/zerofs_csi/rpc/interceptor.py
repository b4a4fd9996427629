"""The one place where domain errors become gRPC statuses, and every call is logged."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from zerofs_csi.errors import CsiError
from zerofs_csi.observability.sanitize import SecretRedactor, describe, printable, secret_values

log = logging.getLogger("zerofs_csi.rpc")

# Called after every RPC with (method, volume_id, seconds, code, reason); the volume id
# is the caller's text, unchecked.
CallObserver = Callable[[str, str, float, grpc.StatusCode, str], None]

# Status messages stay well within gRPC's 8 KiB default for metadata, even when
# percent-encoded.
MAX_STATUS_MESSAGE_BYTES = 2048
# Request values in log lines: enough to recognise a volume id or name.
MAX_LOGGED_VALUE_BYTES = 160


def request_volume_id(request: Message, response: Message | None = None) -> str:
    """The volume a call is about: the request's ``volume_id``; for CreateVolume the id
    of the volume it answered with, else its ``name`` (the id of a name that is one)."""
    fields = request.DESCRIPTOR.fields_by_name
    if "volume_id" in fields:
        return str(request.volume_id)  # type: ignore[attr-defined]
    if request.DESCRIPTOR.name == "CreateVolumeRequest":
        if response is not None:
            return str(response.volume.volume_id)  # type: ignore[attr-defined]
        return str(request.name)  # type: ignore[attr-defined]
    return ""


class CsiInterceptor(grpc.ServerInterceptor):
    """Maps CsiError to its status code and anything else to INTERNAL; logs each call.

    Each call gets a request id, returned to the caller as ``x-request-id`` trailing
    metadata and present in every log line about the call. Secrets in requests are
    remembered by the redactor before anything is logged.
    """

    def __init__(
        self, redactor: SecretRedactor, observers: list[CallObserver] | None = None
    ) -> None:
        self._redactor = redactor
        self._observers = list(observers or [])

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        behaviour = handler.unary_unary

        def call(request: Message, context: grpc.ServicerContext) -> Any:
            return self._call(method, behaviour, request, context)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _call(
        self,
        method: str,
        behaviour: Callable[[Message, grpc.ServicerContext], Any],
        request: Message,
        context: grpc.ServicerContext,
    ) -> Any:
        request_id = uuid.uuid4().hex[:16]
        self._redactor.remember(secret_values(request))
        volume_id = request_volume_id(request)
        fields: dict[str, object] = {"request_id": request_id, "method": method}
        if volume_id:
            key = "volume_name" if request.DESCRIPTOR.name == "CreateVolumeRequest" else "volume_id"
            fields[key] = printable(volume_id, MAX_LOGGED_VALUE_BYTES)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={**fields, "request": describe(request)})
        context.set_trailing_metadata((("x-request-id", request_id),))

        start = time.monotonic()
        response = None
        code, message, reason = grpc.StatusCode.OK, "", "OK"
        try:
            response = behaviour(request, context)
        except CsiError as exc:
            code, message, reason = exc.code, exc.message, exc.reason
        except Exception:
            log.exception("unexpected failure", extra=fields)
            code = grpc.StatusCode.INTERNAL
            reason = code.name
            message = (
                f"internal error in {method}; "
                f"the plugin log has details under request id {request_id}"
            )
        duration = time.monotonic() - start

        outcome = {**fields, "duration_ms": round(duration * 1000, 3), "code": code.name}
        if code is grpc.StatusCode.OK:
            log.info("call ok", extra=outcome)
        else:
            log.warning("call failed: %s", message, extra=outcome)
        for observe in self._observers:
            observe(method, request_volume_id(request, response), duration, code, reason)
        if code is not grpc.StatusCode.OK:
            # Messages carry text from servers and callers: one safe line, bounded.
            context.abort(code, printable(self._redactor.redact(message), MAX_STATUS_MESSAGE_BYTES))
        return response
