"""CSI Node service."""

from __future__ import annotations

import grpc

from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.servicer import answer_unimplemented


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, max_volumes_per_node: int) -> None:
        self._node_id = node_id
        self._max_volumes = max_volumes_per_node

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id, max_volumes_per_node=self._max_volumes
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[])


answer_unimplemented(NodeService, csi_pb2_grpc.NodeServicer, "Node")
