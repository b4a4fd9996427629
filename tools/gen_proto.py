"""Generate the Python stubs of the project's protos.

    python tools/gen_proto.py          regenerate every target below
    python tools/gen_proto.py --check  exit 1 if a committed file is stale

- proto/csi.proto -> src/zerofs_csi/csi/csi_pb2*.py{,i} (package ``csi.v1``)
- proto/zerofs_admin.proto -> src/zerofs_csi/zerofs_admin/admin_pb2*.py{,i} (ZeroFS's
  admin service, ``zerofs.admin``), and its descriptor set with its imports,
  tools/zerofs_standin_admin.pb, from which the ZeroFS stand-in builds its messages at
  run time: it runs on Debian's python3, whose protobuf (4.21) refuses modules generated
  for the newer runtime the driver uses.

protoc names the import of a ``_pb2`` module inside its ``_pb2_grpc.py`` after the
.proto's path relative to the include root. Each proto is therefore staged under a
temporary include root at the path of its package directory (for example
zerofs_csi/csi/csi.proto), so protoc itself writes ``from zerofs_csi.csi import csi_pb2``
and the output needs no rewriting.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIFF_LINES_SHOWN = 40


@dataclass(frozen=True)
class Target:
    """One .proto and what is generated from it."""

    source: Path
    staged: Path  # where it sits under the include root: decides the module path
    stub_dir: Path
    descriptor_set: Path | None = None  # the file's descriptors and its imports'

    @property
    def stem(self) -> str:
        return self.staged.stem

    @property
    def generated_files(self) -> tuple[str, ...]:
        return (f"{self.stem}_pb2.py", f"{self.stem}_pb2.pyi", f"{self.stem}_pb2_grpc.py")

    def outputs(self, root: Path) -> dict[str, Path]:
        """Each generated file by name, under ``root`` in place of the repository."""
        where = {name: self.stub_dir / name for name in self.generated_files}
        if self.descriptor_set is not None:
            where[self.descriptor_set.name] = self.descriptor_set
        return {name: root / path.relative_to(REPO_ROOT) for name, path in where.items()}


TARGETS = (
    Target(
        source=REPO_ROOT / "proto" / "csi.proto",
        staged=Path("zerofs_csi") / "csi" / "csi.proto",
        stub_dir=REPO_ROOT / "src" / "zerofs_csi" / "csi",
    ),
    Target(
        source=REPO_ROOT / "proto" / "zerofs_admin.proto",
        staged=Path("zerofs_csi") / "zerofs_admin" / "admin.proto",
        stub_dir=REPO_ROOT / "src" / "zerofs_csi" / "zerofs_admin",
        descriptor_set=REPO_ROOT / "tools" / "zerofs_standin_admin.pb",
    ),
)


class GenerationError(RuntimeError):
    """protoc failed or did not write the expected files."""


def generate(target: Target, root: Path) -> None:
    """Run protoc on ``target`` and write its outputs under ``root`` (REPO_ROOT or a
    directory mirroring it)."""
    # Imported here so --help works without the dev extra installed.
    from grpc_tools import protoc

    well_known_protos = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="zerofs-csi-proto-") as work:
        include_root = Path(work) / "include"
        out_root = Path(work) / "out"
        staged = include_root / target.staged
        staged.parent.mkdir(parents=True)
        out_root.mkdir()
        shutil.copyfile(target.source, staged)
        argv = [
            "grpc_tools.protoc",
            f"-I{include_root}",
            f"-I{well_known_protos}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
        ]
        if target.descriptor_set is not None:
            argv += [f"--descriptor_set_out={out_root / 'descriptors.pb'}", "--include_imports"]
        status = protoc.main([*argv, str(target.staged)])
        if status != 0:
            raise GenerationError(f"protoc exited with status {status} on {target.source}")
        produced = {name: out_root / target.staged.parent / name for name in target.generated_files}
        if target.descriptor_set is not None:
            produced[target.descriptor_set.name] = out_root / "descriptors.pb"
        for name, destination in target.outputs(root).items():
            if not produced[name].is_file():
                raise GenerationError(f"protoc did not produce {name}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(produced[name], destination)


def stale_files(target: Target, fresh_root: Path) -> dict[str, list[str]]:
    """Map each committed output of ``target`` that differs from its fresh version under
    ``fresh_root`` to a unified diff (a one-line note for the binary descriptor set)."""
    stale: dict[str, list[str]] = {}
    committed_outputs = target.outputs(REPO_ROOT)
    for name, fresh_path in target.outputs(fresh_root).items():
        committed_path = committed_outputs[name]
        committed = committed_path.read_bytes() if committed_path.is_file() else b""
        fresh = fresh_path.read_bytes()
        if committed == fresh:
            continue
        if name.endswith(".pb"):
            stale[name] = [f"{committed_path}: binary descriptor set differs\n"]
            continue
        stale[name] = list(
            difflib.unified_diff(
                committed.decode().splitlines(keepends=True),
                fresh.decode().splitlines(keepends=True),
                fromfile=f"committed/{name}",
                tofile=f"generated/{name}",
            )
        )
    return stale


def check() -> dict[str, list[str]]:
    """Generate every target into a temporary tree and compare with the committed files."""
    stale: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="zerofs-csi-proto-check-") as fresh:
        for target in TARGETS:
            generate(target, Path(fresh))
            stale.update(stale_files(target, Path(fresh)))
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed files differ from freshly generated ones",
    )
    args = parser.parse_args(argv)
    if not args.check:
        for target in TARGETS:
            generate(target, REPO_ROOT)
            written = ", ".join(
                str(path.relative_to(REPO_ROOT)) for path in target.outputs(REPO_ROOT).values()
            )
            print(f"generated {written}")
        return 0
    stale = check()
    if not stale:
        print("generated protocol files are up to date")
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
