"""CSI Controller service."""

from __future__ import annotations

import grpc

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.servicer import answer_unimplemented


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[])


answer_unimplemented(ControllerService, csi_pb2_grpc.ControllerServicer, "Controller")
