"""Generate the Python CSI stubs from proto/csi.proto.

    python tools/gen_proto.py          regenerate src/zerofs_csi/csi/csi_pb2*.py{,i}
    python tools/gen_proto.py --check  exit 1 if the committed stubs are stale

protoc names the import of csi_pb2 inside csi_pb2_grpc.py after the .proto's
path relative to the include root. The proto is therefore staged as
zerofs_csi/csi/csi.proto under a temporary include root, so protoc itself writes
``from zerofs_csi.csi import csi_pb2`` and the output needs no rewriting.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_SOURCE = REPO_ROOT / "proto" / "csi.proto"
STUB_DIR = REPO_ROOT / "src" / "zerofs_csi" / "csi"
# Where the proto sits relative to the include root; it decides the module path.
STAGED_PROTO = Path("zerofs_csi") / "csi" / "csi.proto"
GENERATED_FILES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")
DIFF_LINES_SHOWN = 40


class GenerationError(RuntimeError):
    """protoc failed or did not write the expected files."""


def generate(dest: Path) -> None:
    """Run protoc on PROTO_SOURCE and write GENERATED_FILES into dest."""
    # Imported here so --help works without the dev extra installed.
    from grpc_tools import protoc

    well_known_protos = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="zerofs-csi-proto-") as work:
        include_root = Path(work) / "include"
        out_root = Path(work) / "out"
        staged = include_root / STAGED_PROTO
        staged.parent.mkdir(parents=True)
        out_root.mkdir()
        shutil.copyfile(PROTO_SOURCE, staged)
        argv = [
            "grpc_tools.protoc",
            f"-I{include_root}",
            f"-I{well_known_protos}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(STAGED_PROTO),
        ]
        status = protoc.main(argv)
        if status != 0:
            raise GenerationError(f"protoc exited with status {status} on {PROTO_SOURCE}")
        produced = out_root / STAGED_PROTO.parent
        dest.mkdir(parents=True, exist_ok=True)
        for name in GENERATED_FILES:
            source = produced / name
            if not source.is_file():
                raise GenerationError(f"protoc did not produce {name}")
            shutil.copyfile(source, dest / name)


def stale_files(committed_dir: Path, fresh_dir: Path) -> dict[str, list[str]]:
    """Map each generated file that differs from its fresh version to a unified diff."""
    stale: dict[str, list[str]] = {}
    for name in GENERATED_FILES:
        fresh = (fresh_dir / name).read_text(encoding="utf-8")
        committed_path = committed_dir / name
        committed = committed_path.read_text(encoding="utf-8") if committed_path.is_file() else ""
        if committed != fresh:
            stale[name] = list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    fromfile=f"committed/{name}",
                    tofile=f"generated/{name}",
                )
            )
    return stale


def check(committed_dir: Path = STUB_DIR) -> dict[str, list[str]]:
    """Generate into a temporary directory and compare with committed_dir."""
    with tempfile.TemporaryDirectory(prefix="zerofs-csi-proto-check-") as fresh:
        fresh_dir = Path(fresh)
        generate(fresh_dir)
        return stale_files(committed_dir, fresh_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed stubs differ from freshly generated ones",
    )
    args = parser.parse_args(argv)
    if not args.check:
        generate(STUB_DIR)
        print(f"generated {', '.join(GENERATED_FILES)} in {STUB_DIR.relative_to(REPO_ROOT)}")
        return 0
    stale = check()
    if not stale:
        print("CSI stubs are up to date")
        return 0
    for name, diff in stale.items():
        added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
        removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
        print(f"{name}: stale (+{added} -{removed} lines)", file=sys.stderr)
        sys.stderr.writelines(diff[:DIFF_LINES_SHOWN])
        if len(diff) > DIFF_LINES_SHOWN:
            print(f"... {len(diff) - DIFF_LINES_SHOWN} more diff lines", file=sys.stderr)
    print("run `python tools/gen_proto.py` (make proto) and commit the result", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
