"""ZeroFS's admin service (package ``zerofs.admin``): the checkpoint and flush calls.

admin_pb2*.py and admin_pb2.pyi are generated from proto/zerofs_admin.proto by
tools/gen_proto.py; regenerate them with ``make proto`` instead of editing them.
"""
