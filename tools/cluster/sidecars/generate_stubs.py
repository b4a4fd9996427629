"""Generates the Python modules of .proto files into a directory, as top-level modules
that import each other by name (``csi.proto`` gives ``csi_pb2.py`` and
``csi_pb2_grpc.py``), so that directory goes on ``sys.path``: the sidecar stand-ins' own
directory in their image. Needs grpcio-tools.

    python generate_stubs.py DEST PROTO...
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path


def generate(dest: Path, protos: list[Path]) -> None:
    from grpc_tools import protoc

    dest.mkdir(parents=True, exist_ok=True)
    for proto in protos:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto.parent}",
                f"-I{resources.files('grpc_tools') / '_proto'}",
                f"--python_out={dest}",
                f"--grpc_python_out={dest}",
                proto.name,
            ]
        )
        made = [dest / f"{proto.stem}_pb2.py", dest / f"{proto.stem}_pb2_grpc.py"]
        if status != 0 or not all(path.is_file() for path in made):
            raise SystemExit(f"protoc failed on {proto} (status {status})")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(f"usage: {sys.argv[0]} DEST PROTO...")
    generate(Path(sys.argv[1]), [Path(name).resolve() for name in sys.argv[2:]])
