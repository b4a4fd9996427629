"""CSI Identity service."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

from zerofs_csi import __version__
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.errors import FailedPrecondition
from zerofs_csi.observability.readiness import Readiness, State

PluginCapability = csi_pb2.PluginCapability


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        driver_name: str,
        readiness: Readiness,
        capabilities: list[csi_pb2.PluginCapability],
    ) -> None:
        self._driver_name = driver_name
        self._readiness = readiness
        self._capabilities = list(capabilities)

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=self._capabilities)

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        state = self._readiness.state
        if state is State.FAILED:
            raise FailedPrecondition(f"plugin is not healthy: {self._readiness.problem}")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=state is State.READY))


def service_capability(kind: int) -> csi_pb2.PluginCapability:
    return PluginCapability(service=PluginCapability.Service(type=kind))  # type: ignore[arg-type]


def expansion_capability(kind: int) -> csi_pb2.PluginCapability:
    return PluginCapability(
        volume_expansion=PluginCapability.VolumeExpansion(type=kind)  # type: ignore[arg-type]
    )
