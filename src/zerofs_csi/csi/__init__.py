"""Container Storage Interface v1.12.0 messages and gRPC stubs (package ``csi.v1``).

csi_pb2*.py and csi_pb2.pyi are generated from proto/csi.proto by
tools/gen_proto.py; regenerate them with ``make proto`` instead of editing them.
"""
