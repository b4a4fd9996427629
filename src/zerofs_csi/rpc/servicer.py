"""Helpers shared by the CSI service classes."""

from __future__ import annotations

from typing import Any

from zerofs_csi.csi import csi_pb2
from zerofs_csi.errors import Unimplemented


def answer_unimplemented(servicer_cls: type, generated_base: type, service_name: str) -> type:
    """Give ``servicer_cls`` an UNIMPLEMENTED answer for every RPC it does not define.

    The generated base class would otherwise raise NotImplementedError, which the
    interceptor reports as INTERNAL; the spec wants UNIMPLEMENTED for RPCs a plugin
    does not offer (and does not advertise).
    """
    service = csi_pb2.DESCRIPTOR.services_by_name[service_name]
    for method in service.methods:
        if getattr(servicer_cls, method.name) is not getattr(generated_base, method.name):
            continue

        def unimplemented(self: Any, request: Any, context: Any, _name: str = method.name) -> Any:
            raise Unimplemented(f"{service_name}.{_name} is not supported by this driver")

        unimplemented.__name__ = method.name
        setattr(servicer_cls, method.name, unimplemented)
    return servicer_cls
