"""The Dockerfile, which cannot be built here (no container engine), against the code.

The runtime stage must install exactly the Debian packages holding what the driver
executes or loads (found by asking dpkg on this host which package owns each tool the
code names), and those must be what tools/host-packages.txt gives the tests. The build
stage must provide the C headers the Cython extension includes.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from chart.conftest import CHART, ROOT, Helm, container, find
from zerofs_csi.host import filesystems
from zerofs_csi.servers import export_copy

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HOST_PACKAGES = ROOT / "tools" / "host-packages.txt"
LOCKS = ROOT / "requirements"
PXD = ROOT / "src" / "zerofs_csi" / "nbd" / "_nbd_linux.pxd"
INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/include/x86_64-linux-gnu"))


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def apt_packages(self) -> list[str]:
        packages = []
        for keyword, argument in self.instructions:
            if keyword != "RUN":
                continue
            for match in re.finditer(r"\bapt-get\s+install\s+([^&;|]*)", argument):
                packages += [w for w in shlex.split(match.group(1)) if not w.startswith("-")]
        return packages


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = argument.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif keyword == "ARG" and not stages:
            key, _, default = argument.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((keyword, argument.strip()))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def owning_package(path: Path) -> str:
    """The installed Debian package that owns ``path`` (merged-/usr aware)."""
    text = str(path)
    candidates = [text, text.removeprefix("/usr"), "/usr" + text]
    for candidate in candidates:
        done = subprocess.run(
            ["dpkg-query", "-S", candidate], capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0:
            package = done.stdout.split(":", 1)[0]
            return package
    raise AssertionError(f"no installed package owns {path} (run tools/bootstrap.sh)")


def executables_the_driver_runs(helm: Helm) -> set[str]:
    tools = set()
    for fs in filesystems.SUPPORTED:
        tools.add(filesystems.mkfs_argv(fs, "/dev/nbd0")[0])
        tools.add(filesystems.grow_argv(fs, "/dev/nbd0", "/mnt")[0])
    # Restores and clones copy exports with nbdcopy (in the restore pod's copy container).
    tools.add(export_copy.NBDCOPY)
    # The chart's nbd init container runs in the plugin image too.
    spec = find(helm.render(CHART), "DaemonSet")["spec"]["template"]["spec"]
    script = container(spec, "load-nbd")["command"][-1]
    tools |= {line.split()[0] for line in script.splitlines() if line.startswith("modprobe ")}
    return tools


def library_path(name: str) -> Path:
    soname = ctypes.util.find_library(name)
    assert soname, f"lib{name} is not installed on this host"
    for line in subprocess.run(
        ["ldconfig", "-p"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines():
        if line.strip().startswith(soname + " "):
            return Path(line.rsplit("=>", 1)[1].strip())
    raise AssertionError(f"ldconfig does not list {soname}")


def runtime_packages_needed(helm: Helm) -> dict[str, str]:
    """Package -> what of it the driver uses."""
    needed: dict[str, str] = {}
    for tool in sorted(executables_the_driver_runs(helm)):
        found = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/sbin"]))
        assert found, f"{tool} is not installed on this host (run tools/bootstrap.sh)"
        needed.setdefault(owning_package(Path(found).resolve()), tool)
    # fsprobe.py loads libblkid through ctypes.
    source = (ROOT / "src" / "zerofs_csi" / "host" / "fsprobe.py").read_text()
    for library in re.findall(r'find_library\("(\w+)"\)', source):
        needed.setdefault(owning_package(library_path(library).resolve()), f"lib{library}")
    return needed


def test_runtime_stage_installs_exactly_what_the_driver_calls(
    helm: Helm, stages: list[Stage]
) -> None:
    needed = runtime_packages_needed(helm)
    assert {"e2fsprogs", "xfsprogs", "btrfs-progs", "kmod"} <= set(needed), needed
    runtime = stages[-1]
    assert runtime.name is None
    assert sorted(runtime.apt_packages()) == sorted(needed)


def test_host_packages_give_the_tests_the_same_tools(helm: Helm) -> None:
    listed = {
        line.strip()
        for line in HOST_PACKAGES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    depends = set()
    for package in listed:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", package],
            capture_output=True,
            text=True,
            timeout=60,
        )
        depends |= {re.split(r"[ (:]", d.strip())[0] for d in done.stdout.split(",") if d.strip()}
    for package, use in runtime_packages_needed(helm).items():
        assert package in listed | depends, f"{package} ({use}) is not in {HOST_PACKAGES.name}"


def test_build_stage_has_the_compiler_and_the_headers_the_extension_includes(
    stages: list[Stage],
) -> None:
    (build,) = [s for s in stages if s.name == "build"]
    packages = set(build.apt_packages())
    assert "gcc" in packages
    headers = re.findall(r'cdef extern from "<([^>]+)>"', PXD.read_text())
    assert "linux/nbd.h" in headers
    owners = {}
    for header in headers:
        paths = [d / header for d in INCLUDE_DIRS if (d / header).exists()]
        assert paths, f"<{header}> is not installed on this host"
        owners[header] = owning_package(paths[0])
    assert set(owners.values()) <= packages, owners


def test_stages_build_the_wheel_for_the_project_python(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = pyproject["tool"]["mypy"]["python_version"]
    for stage in stages:
        assert re.search(rf"python:{re.escape(python)}-slim-bookworm$", stage.image), stage.image
    (build,) = [s for s in stages if s.name == "build"]
    tag = "cp" + python.replace(".", "")
    assert any(f"zerofs_csi-*-{tag}-*.whl" in arg for _, arg in build.instructions)
    entrypoint = [arg for keyword, arg in stages[-1].instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == [f'["{next(iter(pyproject["project"]["scripts"]))}"]']


def test_build_context_holds_what_the_dockerfile_copies(stages: list[Stage]) -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    # Everything is excluded first; only what the build copies comes back.
    assert "*" in ignore
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = []
    for stage in stages:
        for keyword, argument in stage.instructions:
            if keyword == "COPY" and not argument.startswith("--from"):
                copied += argument.split()[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    # setup.py builds the extension from these.
    for needed in (
        "src/zerofs_csi/nbd/_nbd.pyx",
        "src/zerofs_csi/nbd/_nbd_linux.pxd",
        "proto/csi.proto",
    ):
        assert (ROOT / needed).exists()


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, Pin]:
    """A hashed requirements file: ``name==version --hash=sha256:... ...`` entries."""
    pins: dict[str, Pin] = {}
    joined = re.sub(r"\\\n", " ", path.read_text())
    for raw in joined.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        requirement = Requirement(words[0])
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {words[0]} is not pinned exactly"
        hashes = tuple(w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash="))
        assert hashes, f"{path.name}: {words[0]} has no hash"
        pins[canonicalize_name(requirement.name)] = Pin(
            canonicalize_name(requirement.name), specifier.version, hashes
        )
    return pins


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("image.lock", lambda pyproject: pyproject["project"]["dependencies"]),
        ("build.lock", lambda pyproject: pyproject["build-system"]["requires"]),
    ],
)
def test_locks_pin_every_requirement_of_pyproject(
    lock: str, requirements: Callable[[dict[str, Any]], list[str]]
) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here, not in the
    image build (where pip check would only say so after installing everything)."""
    pins = read_lock(LOCKS / lock)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in requirements(pyproject):
        wanted = Requirement(line)
        pin = pins.get(canonicalize_name(wanted.name))
        assert pin is not None, f"{wanted.name} is not in requirements/{lock}: run make lock"
        assert wanted.specifier.contains(pin.version, prereleases=True), (
            f"requirements/{lock} pins {pin.name}=={pin.version}, outside {line!r}: run make lock"
        )
        assert all(h.startswith("sha256:") for h in pin.hashes), pin


def test_stages_install_only_from_the_locks(stages: list[Stage]) -> None:
    (build,) = [s for s in stages if s.name == "build"]
    runtime = stages[-1]

    def pip_commands(stage: Stage) -> list[list[str]]:
        commands = []
        for keyword, argument in stage.instructions:
            if keyword != "RUN":
                continue
            lexer = shlex.shlex(argument, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for word in [*lexer, "&&"]:
                if word not in ("&&", ";", "||"):
                    words.append(word)
                    continue
                if words[:3] == ["python", "-m", "pip"]:
                    commands.append(words[3:])
                words = []
        return commands

    locked = ["install", "--no-cache-dir", "--require-hashes", "--no-deps", "-r"]
    build_pip = pip_commands(build)
    assert build_pip[0] == [*locked, "requirements/build.lock"]
    (wheel,) = [c for c in build_pip if c[0] == "wheel"]
    assert {"--no-build-isolation", "--no-deps"} <= set(wheel)
    runtime_pip = pip_commands(runtime)
    assert runtime_pip[0] == [*locked, "/tmp/requirements/image.lock"]
    project = runtime_pip[1]
    assert project[0] == "install" and {"--no-deps", "--no-index"} <= set(project)
    assert runtime_pip[2:] == [["check"]]
