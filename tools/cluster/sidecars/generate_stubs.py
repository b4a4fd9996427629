"""Generates the Python modules of pluginregistration.proto into a directory:
``pluginregistration_pb2.py`` and ``pluginregistration_pb2_grpc.py``, which import each
other as top-level modules, so that directory goes on ``sys.path`` (the sidecar
stand-ins' own directory in their image). Needs grpcio-tools.

    python generate_stubs.py DEST
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO = Path(__file__).resolve().with_name("pluginregistration.proto")
GENERATED = ("pluginregistration_pb2.py", "pluginregistration_pb2_grpc.py")


def generate(dest: Path) -> None:
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            f"--python_out={dest}",
            f"--grpc_python_out={dest}",
            PROTO.name,
        ]
    )
    missing = [name for name in GENERATED if not (dest / name).is_file()]
    if status != 0 or missing:
        raise SystemExit(f"protoc failed on {PROTO} (status {status}, missing {missing})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DEST")
    generate(Path(sys.argv[1]))
