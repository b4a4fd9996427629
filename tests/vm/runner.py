#!/usr/bin/env python3
"""Run a command inside a QEMU (TCG) microVM whose kernel has NBD, ext4, xfs and btrfs.

Usage: python3 tests/vm/runner.py [options] -- CMD ARGS...

The guest runs Debian's stock kernel (downloaded with apt-get, cached in the folder
tools/cache-dir names) with the host root mounted read-only over 9p and the
repository work tree mounted read-write at its host path, so the repo's .venv
and absolute paths work unchanged. The command's stdout and stderr are streamed
live over virtio-serial ports; the kernel console goes to a log file.

Exit status: the command's own status, 124 when --timeout expires, 125 when the
VM cannot be prepared, does not boot, or stops before reporting the command's
status. Standard library only: it must run on a fresh machine, before any venv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn

EXIT_TIMEOUT = 124
EXIT_VM_FAILURE = 125

VM_DIR = Path(__file__).resolve().parent
REPO_ROOT = VM_DIR.parent.parent
# Every apt-get of the project, one at a time (make test runs targets side by side).
APT_INSTALL = REPO_ROOT / "tools" / "apt-install"


def machine_cache_dir() -> Path:
    """Where builds are cached, shared by every clone on the machine (tools/cache-dir)."""
    command = [str(REPO_ROOT / "tools" / "cache-dir")]
    return Path(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


# The kernel and initramfs.
CACHE_DIR = machine_cache_dir() / "vm"
# Each run's directory (console log, status), in this clone.
RUNS_DIR = REPO_ROOT / ".cache" / "vm" / "runs"
STAGE1_INIT = VM_DIR / "initramfs_init.sh"
STAGE2_INIT = VM_DIR / "guest_init.sh"

# Debian packages the host needs to build and run the VM, and the guest needs to
# run the privileged tests (the guest's userland is the host root).
HOST_PACKAGES = (
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "nbdkit",
    "nbdkit-plugin-python",  # the stand-in's s3:// storage (brings python3-boto3)
    "ceph-mon",  # with ceph-osd and radosgw: the S3 server of the privileged S3 test
    "ceph-osd",
    "radosgw",
    "nbd-client",
    "diod",
    "socat",
    "e2fsprogs",
    "xfsprogs",
    "btrfs-progs",
    "fio",
)
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
# Enough to mount 9p shares and open virtio-serial ports; nbd and filesystems
# are loaded by stage 2 from the full module tree on the work-tree share.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_console")
# Bumped when the archive layout changes in a way the hashed inputs do not show.
INITRAMFS_FORMAT = "1"

PORT_STDOUT = "zerofs_vm.stdout"
PORT_STDERR = "zerofs_vm.stderr"
PORT_CONTROL = "zerofs_vm.control"
HOST_ROOT_TAG = "hostroot"
WORK_TREE_TAG = "worktree"
VENV_TAG = "venv"

GUEST_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories the guest covers with fresh tmpfs mounts: a working directory
# below them would not exist in the guest.
# The guest's network when it has one (--forward): QEMU's user-mode defaults.
GUEST_NETWORK = "10.0.2.0/24"
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
GUEST_FORWARD_ADDRESS = "10.0.2.100"
GUEST_TMPFS_DIRS = ("/tmp", "/var/tmp", "/run", "/var/log", "/proc", "/sys", "/dev")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A kernel tree not used for this long is removed once a newer one is cached.
KERNEL_TREE_KEEP_SECONDS = 86400.0

# Seconds QEMU gets to exit after the guest reported the command's status.
POWER_OFF_GRACE = 30.0

# Linux prctl(2): PR_SET_PDEATHSIG = 1 (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1


class VmError(Exception):
    """The VM could not be prepared or run (exit status 125)."""


def log(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- host packages


class Apt:
    """apt-get with at most one `apt-get update` per runner invocation."""

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        if self.updated:
            return
        log("apt-get update")
        run_checked([str(APT_INSTALL), "--update"], "apt-get update")
        self.updated = True

    def install(self, packages: Sequence[str]) -> None:
        log(f"installing {' '.join(packages)}")
        run_checked([str(APT_INSTALL), *packages], "apt-get install")
        self.updated = True  # apt-install refreshed the lists first


def run_checked(
    argv: Sequence[str],
    what: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
) -> str:
    """Run a host command; a failure becomes VmError naming `what`."""
    try:
        completed = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            check=False,
            stdout=subprocess.PIPE if capture else sys.stderr,
            stderr=subprocess.PIPE if capture else None,
            text=True,
        )
    except FileNotFoundError as exc:
        raise VmError(f"{what}: {argv[0]} not found") from exc
    if completed.returncode != 0:
        detail = f": {completed.stderr.strip()}" if capture and completed.stderr else ""
        raise VmError(f"{what} failed with status {completed.returncode}{detail}")
    return completed.stdout if capture else ""


def parse_installed_packages(dpkg_query_output: str) -> set[str]:
    """Names whose dpkg status is installed, from `${Package} ${db:Status-Abbrev}` lines."""
    installed = set()
    for line in dpkg_query_output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ii"):
            installed.add(parts[0])
    return installed


def missing_packages(packages: Sequence[str]) -> list[str]:
    # dpkg-query exits 1 when some name is unknown; its stdout still lists the rest.
    completed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages],
        check=False,
        capture_output=True,
        text=True,
    )
    installed = parse_installed_packages(completed.stdout)
    return [name for name in packages if name not in installed]


def ensure_packages(apt: Apt) -> None:
    missing = missing_packages(HOST_PACKAGES)
    if not missing:
        return
    if os.geteuid() != 0:
        raise VmError(f"missing packages {' '.join(missing)} and not root to install them")
    apt.install(missing)
    still_missing = missing_packages(HOST_PACKAGES)
    if still_missing:
        raise VmError(f"packages still missing after apt-get install: {' '.join(still_missing)}")


# ---------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class KernelPackage:
    name: str
    version: str

    @property
    def cache_name(self) -> str:
        return f"{self.name}_{self.version}"


@dataclass(frozen=True)
class Kernel:
    tree: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.release}"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed kernel, present when it can boot through PVH."""
        return self.tree / "boot" / f"vmlinux-{self.release}"

    @property
    def config(self) -> Path:
        return self.tree / "boot" / f"config-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.tree / "lib" / "modules" / self.release


def parse_kernel_dependency(apt_cache_show_output: str) -> KernelPackage:
    """The versioned linux-image package named by the meta package's Depends field.

    Input: `apt-cache show --no-all-versions linux-image-amd64`, whose Depends
    reads e.g. `linux-image-6.1.0-56-amd64 (= 6.1.192-2)`.
    """
    for line in apt_cache_show_output.splitlines():
        if not line.startswith("Depends:"):
            continue
        for clause in line.removeprefix("Depends:").split(","):
            first = clause.split("|")[0].strip()
            match = re.fullmatch(r"(linux-image-[^\s(]+)\s*\(\s*=\s*([^\s)]+)\s*\)", first)
            if match:
                return KernelPackage(match.group(1), match.group(2))
    raise VmError(f"{KERNEL_META_PACKAGE} does not depend on a versioned linux-image package")


def resolve_kernel_package(apt: Apt) -> KernelPackage:
    def show() -> str:
        completed = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
            check=False,
            capture_output=True,
            text=True,
        )
        return completed.stdout if completed.returncode == 0 else ""

    output = show()
    if "Depends:" not in output:
        apt.update()
        output = show()
    return parse_kernel_dependency(output)


def download_package(apt: Apt, package: KernelPackage, directory: Path) -> Path:
    argv = [
        "apt-get",
        "download",
        "-q",
        # The cache directory belongs to root; apt's _apt sandbox user cannot write it.
        "-o",
        "APT::Sandbox::User=root",
        f"{package.name}={package.version}",
    ]
    log(f"downloading {package.name} {package.version}")
    try:
        run_checked(argv, "apt-get download", cwd=directory)
    except VmError:
        if apt.updated:
            raise
        # Stale package lists name a version the mirror no longer has.
        apt.update()
        run_checked(argv, "apt-get download", cwd=directory)
    debs = sorted(directory.glob(f"{package.name}_*.deb"))
    if len(debs) != 1:
        raise VmError(f"apt-get download left {len(debs)} {package.name} packages")
    return debs[0]


def prepare_kernel(apt: Apt, package: KernelPackage) -> Kernel:
    kernels_dir = CACHE_DIR / "kernel"
    tree = kernels_dir / package.cache_name
    complete_marker = tree / ".complete"
    if not complete_marker.exists():
        staging = kernels_dir / f".staging-{package.cache_name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        staging.mkdir(parents=True)
        deb = download_package(apt, package, staging)
        extracted = staging / "tree"
        log(f"extracting {deb.name}")
        run_checked(["dpkg-deb", "-x", str(deb), str(extracted)], "dpkg-deb -x")
        release = single_release(extracted)
        # Debian's package leaves modules.dep to its postinst; kmod needs it.
        run_checked(["depmod", "-b", str(extracted), release], "depmod")
        extracted.rename(tree)
        shutil.rmtree(staging)
        complete_marker.write_text(f"{package.name} {package.version}\n")
    # The marker's mtime says when a tree was last used. A VM still running
    # from an older tree loads modules from it: only trees unused for a day go.
    os.utime(complete_marker)
    for other in kernels_dir.iterdir():
        if other != tree and unused_for(other / ".complete", KERNEL_TREE_KEEP_SECONDS):
            shutil.rmtree(other, ignore_errors=True)
    kernel = Kernel(tree, single_release(tree))
    if not kernel.vmlinuz.is_file():
        raise VmError(f"{kernel.vmlinuz} missing from {package.name}")
    return kernel


# x86 boot protocol (the kernel's Documentation/arch/x86/boot.rst): setup_sects
# at 0x1F1 (0 means 4), the "HdrS" magic at 0x202, and since protocol 2.08
# payload_offset and payload_length at 0x248/0x24C, relative to the start of the
# protected-mode code, which follows the (setup_sects + 1) 512-byte sectors.
BZIMAGE_SETUP_SECTS = 0x1F1
BZIMAGE_HEADER_MAGIC = (0x202, b"HdrS")
BZIMAGE_PAYLOAD = 0x248
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"


def uncompressed_kernel(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, or None when its compression is not xz or gzip."""
    offset, magic = BZIMAGE_HEADER_MAGIC
    if len(bzimage) < BZIMAGE_PAYLOAD + 8 or bzimage[offset : offset + len(magic)] != magic:
        return None
    setup_sects = bzimage[BZIMAGE_SETUP_SECTS] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, BZIMAGE_PAYLOAD)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    # Both decompressors stop at the end of the stream: the build appends the
    # uncompressed size after it.
    try:
        if payload.startswith(XZ_MAGIC):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(GZIP_MAGIC):
            elf = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def boot_image(kernel: Kernel) -> Path:
    """The image QEMU boots: the uncompressed vmlinux through PVH when possible.

    QEMU boots an ELF kernel carrying the PVH entry note (CONFIG_PVH) straight
    into 64-bit code, skipping SeaBIOS's real-mode loader and the in-guest
    decompression of the bzImage, which under TCG take about 2.5 s.
    """
    if kernel.vmlinux.is_file():
        return kernel.vmlinux
    try:
        pvh = "CONFIG_PVH=y" in kernel.config.read_text().splitlines()
    except OSError:
        pvh = False
    elf = uncompressed_kernel(kernel.vmlinuz.read_bytes()) if pvh else None
    if elf is None:
        return kernel.vmlinuz
    partial = kernel.vmlinux.with_suffix(".partial")
    partial.write_bytes(elf)
    partial.rename(kernel.vmlinux)
    return kernel.vmlinux


def unused_for(marker: Path, seconds: float) -> bool:
    try:
        return time.time() - marker.stat().st_mtime > seconds
    except FileNotFoundError:
        return True


def single_release(tree: Path) -> str:
    releases = [entry.name for entry in (tree / "lib" / "modules").iterdir() if entry.is_dir()]
    if len(releases) != 1:
        raise VmError(f"expected one kernel release in {tree}, found {releases}")
    return releases[0]


# ------------------------------------------------------------------- initramfs


def parse_show_depends(output: str, modules_dir: Path) -> list[str]:
    """Turn `modprobe --show-depends` output into unique `relative/path.ko [params]` lines.

    kmod prints `insmod /abs/path.ko [params]` in load order (dependencies
    first) and `builtin NAME` for what the kernel already contains. Paths become
    relative to the initramfs root (lib/modules/RELEASE/...).
    """
    base = modules_dir.parent.parent.parent
    lines: list[str] = []
    seen: set[str] = set()
    for raw in output.splitlines():
        words = raw.split()
        if not words or words[0] == "builtin":
            continue
        if words[0] != "insmod" or len(words) < 2:
            raise VmError(f"unexpected modprobe --show-depends line: {raw!r}")
        path = Path(words[1])
        try:
            relative = path.relative_to(base)
        except ValueError as exc:
            raise VmError(f"module {path} lies outside {base}") from exc
        if str(relative) in seen:
            continue
        seen.add(str(relative))
        lines.append(" ".join([str(relative), *words[2:]]))
    return lines


def initramfs_module_lines(kernel: Kernel) -> list[str]:
    output = run_checked(
        [
            "modprobe",
            "--show-depends",
            # The host's /etc/modprobe.d is for the host kernel: ignore it.
            "--config=/dev/null",
            "-d",
            str(kernel.tree),
            "-S",
            kernel.release,
            "-a",
            *INITRAMFS_MODULES,
        ],
        "modprobe --show-depends",
        capture=True,
    )
    return parse_show_depends(output, kernel.modules_dir)


@dataclass(frozen=True)
class ArchiveEntry:
    """One member of a newc cpio archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000


def newc_archive(entries: Iterable[ArchiveEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks into its initramfs.

    Layout from the kernel's Documentation/driver-api/early-userspace/
    buffer-format.rst: magic "070701", thirteen 8-digit hex fields (ino, mode,
    uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
    namesize, check), the NUL-terminated name, padding to 4 bytes, the data,
    padding to 4 bytes; the archive ends with the name "TRAILER!!!". Owner root,
    mtime 0: the same inputs always give the same bytes.
    """
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def member(ino: int, entry: ArchiveEntry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if entry.mode & 0o170000 == S_IFDIR else 1
        fields = (
            ino,
            entry.mode,
            0,
            0,
            nlink,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        out.extend(b"070701" + b"".join(b"%08X" % value for value in fields))
        out.extend(name)
        pad()
        out.extend(entry.data)
        pad()

    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(0, ArchiveEntry("TRAILER!!!", 0))
    return bytes(out)


def initramfs_entries(
    init_script: bytes, busybox: bytes, module_lines: Sequence[str], kernel_tree: Path
) -> list[ArchiveEntry]:
    module_list = "".join(f"{line}\n" for line in module_lines).encode()
    entries = [
        ArchiveEntry(directory, S_IFDIR | 0o755)
        for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys")
    ]
    entries += [
        ArchiveEntry("dev", S_IFDIR | 0o755),
        # The kernel opens /dev/console for init's stdio before /init runs.
        ArchiveEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        ArchiveEntry("newroot", S_IFDIR | 0o755),
        ArchiveEntry("bin/busybox", S_IFREG | 0o755, busybox),
        ArchiveEntry("bin/sh", S_IFLNK | 0o777, b"busybox"),
        ArchiveEntry("init", S_IFREG | 0o755, init_script),
        ArchiveEntry("etc/initramfs-modules", S_IFREG | 0o644, module_list),
    ]
    directories: set[str] = set()
    for line in module_lines:
        relative = line.split()[0]
        parents = Path(relative).parents
        for parent in reversed(parents[:-1]):
            if str(parent) not in directories:
                directories.add(str(parent))
                entries.append(ArchiveEntry(str(parent), S_IFDIR | 0o755))
        entries.append(
            ArchiveEntry(relative, S_IFREG | 0o644, (kernel_tree / relative).read_bytes())
        )
    return entries


def build_initramfs(kernel: Kernel) -> Path:
    """The cached initramfs, rebuilt when the init script, modules or busybox change."""
    init_script = STAGE1_INIT.read_bytes()
    busybox = BUSYBOX.read_bytes()
    module_lines = initramfs_module_lines(kernel)
    key = hashlib.sha256()
    for part in (
        INITRAMFS_FORMAT.encode(),
        init_script,
        hashlib.sha256(busybox).digest(),
        "\n".join(module_lines).encode(),
        str(kernel.tree).encode(),
    ):
        key.update(hashlib.sha256(part).digest())
    digest = key.hexdigest()
    image = CACHE_DIR / "initramfs.cpio"
    key_file = CACHE_DIR / "initramfs.key"
    if image.is_file() and key_file.is_file() and key_file.read_text().strip() == digest:
        return image
    log("building initramfs")
    archive = newc_archive(initramfs_entries(init_script, busybox, module_lines, kernel.tree))
    partial = image.with_suffix(".partial")
    partial.write_bytes(archive)
    partial.rename(image)
    key_file.write_text(digest + "\n")
    return image


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Serialise preparation between runners started at the same time."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class Prepared:
    kernel: Kernel
    boot_image: Path
    initramfs: Path


def prepare() -> Prepared:
    apt = Apt()
    ensure_packages(apt)
    with cache_lock():
        kernel = prepare_kernel(apt, resolve_kernel_package(apt))
        return Prepared(kernel, boot_image(kernel), build_initramfs(kernel))


# ------------------------------------------------------------------ run spec


def guest_environment(
    passthrough: Sequence[str], host_environ: Mapping[str, str], venv_bin: Path | None
) -> dict[str, str]:
    """The command's environment: a fixed base plus what the caller passes with --env.

    `--env NAME` copies the host's value (skipped when unset); `--env NAME=VALUE`
    sets it. PYTHONUNBUFFERED keeps Python output live on the virtio port, which
    is not a terminal.
    """
    path = GUEST_BASE_PATH if venv_bin is None else f"{venv_bin}:{GUEST_BASE_PATH}"
    env = {"PATH": path, "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    for spec in passthrough:
        name, has_value, value = spec.partition("=")
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"--env {spec!r}: not a valid variable name")
        if has_value:
            env[name] = value
        elif name in host_environ:
            env[name] = host_environ[name]
    return env


def command_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The sh script stage 2 runs (from an empty environment) for the command."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    # sh reports a failed cd on stderr itself; the status marks it as the VM's fault.
    lines.append(f"cd -- {shlex.quote(cwd)} || exit {EXIT_VM_FAILURE}")
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in argv))
    return "\n".join(lines) + "\n"


def guest_config(kernel: Kernel) -> str:
    values = {
        "KERNEL_TREE": str(kernel.tree),
        "STDOUT_PORT": PORT_STDOUT,
        "STDERR_PORT": PORT_STDERR,
        "CONTROL_PORT": PORT_CONTROL,
    }
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())


def check_guest_cwd(cwd: str) -> None:
    """Refuse working directories the guest cannot see at the same path."""
    path = os.path.normpath(cwd)
    if not path.startswith("/"):
        raise ValueError(f"--cwd {cwd!r}: must be absolute")
    inside_repo = path == str(REPO_ROOT) or path.startswith(f"{REPO_ROOT}/")
    for hidden in GUEST_TMPFS_DIRS:
        if not inside_repo and (path == hidden or path.startswith(f"{hidden}/")):
            raise ValueError(f"--cwd {cwd!r}: {hidden} is a fresh mount in the guest")


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    memory_mib: int
    cpus: int
    run_dir: Path
    share_venv: bool = False
    kernel_console_quiet: bool = True
    extra_append: tuple[str, ...] = field(default=())
    # (guest port, host port): the guest's GUEST_FORWARD_ADDRESS:port reaches the
    # host's 127.0.0.1:port. Any forward gives the guest a network card.
    forwards: tuple[tuple[int, int], ...] = field(default=())
    # (host port, guest port): the host's 127.0.0.1:port reaches the guest's port.
    host_forwards: tuple[tuple[int, int], ...] = field(default=())
    # Raw disk images the guest sees as /dev/vda, /dev/vdb, ... (read-write).
    disks: tuple[Path, ...] = field(default=())


def kernel_command_line(spec: VmSpec) -> str:
    words = ["console=ttyS0", "panic=-1"]
    if spec.kernel_console_quiet:
        words.append("quiet")
    words += [
        f"zerofs_vm.repo={REPO_ROOT}",
        f"zerofs_vm.init={STAGE2_INIT}",
        f"zerofs_vm.run={spec.run_dir}",
    ]
    if spec.share_venv:
        words.append(f"zerofs_vm.venv={VENV_TAG}")
    if spec.forwards or spec.host_forwards:
        words.append(f"zerofs_vm.net={GUEST_ADDRESS},{GUEST_GATEWAY}")
    words += spec.extra_append
    return " ".join(words)


def network_arguments(
    forwards: Sequence[tuple[int, int]], host_forwards: Sequence[tuple[int, int]] = ()
) -> list[str]:
    """QEMU user networking restricted to the given forwards, on the host's loopback.

    restrict=on: the guest reaches nothing but the forwards (no host address, no
    outside). Each guest connection runs its own socat to the host port, as QEMU's
    guestfwd to a chardev would carry one connection only.
    """
    rules = "".join(
        f",guestfwd=tcp:{GUEST_FORWARD_ADDRESS}:{guest}-cmd:socat - TCP:127.0.0.1:{host}"
        for guest, host in forwards
    )
    rules += "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in host_forwards)
    return [
        "-netdev",
        f"user,id=net0,restrict=on,net={GUEST_NETWORK}{rules}",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def parse_forward(text: str) -> tuple[int, int]:
    """FROM_PORT:TO_PORT, or PORT for the same number on both sides."""
    source, _, target = text.partition(":")
    try:
        ports = int(source), int(target or source)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two ports, FROM:TO") from None
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1-65535")
    return ports


def qemu_command(spec: VmSpec, fds: Mapping[str, int]) -> list[str]:
    """QEMU's argv; `fds` maps console/stdout/stderr/control to inherited pipe fds."""

    def chardev(name: str) -> list[str]:
        return ["-chardev", f"file,id={name},path=/dev/fd/{fds[name]}"]

    argv = [
        "qemu-system-x86_64",
        # KVM is present on these hosts but nested guests hang: always TCG.
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *chardev("console"),
        "-serial",
        "chardev:console",
        "-virtfs",
        f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=passthrough,"
        "readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={REPO_ROOT},mount_tag={WORK_TREE_TAG},security_model=passthrough,"
        "multidevs=remap",
    ]
    if spec.share_venv:
        argv += [
            "-virtfs",
            f"local,path={REPO_ROOT / '.venv'},mount_tag={VENV_TAG},security_model=passthrough,"
            "readonly=on,multidevs=remap",
        ]
    argv += ["-device", "virtio-serial-pci,id=ports"]
    for name, port in (("stdout", PORT_STDOUT), ("stderr", PORT_STDERR), ("control", PORT_CONTROL)):
        argv += chardev(name)
        argv += ["-device", f"virtserialport,bus=ports.0,chardev={name},name={port}"]
    argv += [
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        kernel_command_line(spec),
    ]
    if spec.forwards or spec.host_forwards:
        argv += network_arguments(spec.forwards, spec.host_forwards)
    # werror/rerror=report: a write the host cannot take (its disk full) is the guest's
    # I/O error, not QEMU's default of pausing the guest until the run's timeout.
    for disk in spec.disks:
        argv += [
            "-drive",
            f"file={disk},format=raw,if=virtio,cache=unsafe,werror=report,rerror=report",
        ]
    return argv


# ------------------------------------------------------------------------ run


def parse_control_line(line: str) -> tuple[str, int | None]:
    """Decode one control-port message: ("started", None) or ("exit", STATUS)."""
    if line == "started":
        return "started", None
    match = re.fullmatch(r"exit (\d{1,3})", line)
    if match and int(match.group(1)) <= 255:
        return "exit", int(match.group(1))
    raise ValueError(f"unexpected control message {line!r}")


class Control:
    """What the guest's stage 2 reported on the control port."""

    def __init__(self, started_clock: float) -> None:
        self.started_clock = started_clock
        self.started = threading.Event()
        self.boot_seconds: float | None = None
        self.exit_status: int | None = None
        self.exit_clock = 0.0

    def read(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as source:
            buffered = b""
            while chunk := source.read(4096):
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    self.handle(line.decode(errors="replace").strip())

    def handle(self, line: str) -> None:
        try:
            kind, status = parse_control_line(line)
        except ValueError as exc:
            log(str(exc))
            return
        if kind == "started":
            self.boot_seconds = time.monotonic() - self.started_clock
            log(f"booted in {self.boot_seconds:.1f} s")
            self.started.set()
        else:
            self.exit_clock = time.monotonic()
            self.exit_status = status


def pump(fd: int, sinks: Sequence[BinaryIO]) -> None:
    """Copy a pipe to its sinks until EOF; a closed sink does not stop the draining."""
    live = list(sinks)
    with open(fd, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            for sink in list(live):
                try:
                    sink.write(chunk)
                    sink.flush()
                except (BrokenPipeError, ValueError):
                    live.remove(sink)


def set_parent_death_signal() -> None:
    """Runs in QEMU's child process: die with the runner even if it is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


KERNEL_TROUBLE = re.compile(r"BUG:|Oops|WARNING:|Call Trace:|blocked for more than|Kernel panic")


def report_kernel_trouble(console_log: Path) -> None:
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return
    trouble = [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]
    if trouble:
        log(f"the guest kernel reported problems (full log: {console_log}):")
        for line in trouble[:20]:
            print(f"    {line}", file=sys.stderr)


@dataclass(frozen=True)
class Limits:
    timeout: float
    boot_timeout: float


def watch(
    process: subprocess.Popen[bytes],
    control: Control,
    limits: Limits,
    clock: float,
    console_sinks: Sequence[BinaryIO],
    pipes: Mapping[str, tuple[int, int]],
) -> str:
    """Stream the VM's channels until QEMU exits or a limit expires; QEMU is stopped after."""
    readers = [
        threading.Thread(target=pump, args=(pipes["console"][0], console_sinks)),
        threading.Thread(target=pump, args=(pipes["stdout"][0], [sys.stdout.buffer])),
        threading.Thread(target=pump, args=(pipes["stderr"][0], [sys.stderr.buffer])),
        threading.Thread(target=control.read, args=(pipes["control"][0],)),
    ]
    for reader in readers:
        reader.daemon = True
        reader.start()
    outcome = "exited"
    try:
        while process.poll() is None:
            now = time.monotonic()
            if control.exit_status is not None:
                if now - control.exit_clock > POWER_OFF_GRACE:
                    log(f"the VM did not power off {POWER_OFF_GRACE:g} s after the command ended")
                    break
                # The command is done: the whole-run limit no longer applies.
            elif now - clock > limits.timeout:
                outcome = "timeout"
                break
            if not control.started.is_set() and now - clock > limits.boot_timeout:
                outcome = "boot-timeout"
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)
    finally:
        stop(process)
        # QEMU held the only write ends: its exit gives the readers EOF.
        for reader in readers:
            reader.join(timeout=10)
    return outcome


def run_vm(spec: VmSpec, limits: Limits, echo_console: bool) -> int:
    """Boot the VM, stream the command's output, return the runner's exit status."""
    pipes = {name: os.pipe() for name in ("console", "stdout", "stderr", "control")}
    write_fds = {name: write for name, (_, write) in pipes.items()}
    console_log = spec.run_dir / "console.log"
    qemu_log = spec.run_dir / "qemu.log"
    clock = time.monotonic()
    control = Control(clock)
    with open(qemu_log, "wb") as qemu_output:
        try:
            process = subprocess.Popen(
                qemu_command(spec, write_fds),
                stdin=subprocess.DEVNULL,
                stdout=qemu_output,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(write_fds.values()),
                preexec_fn=set_parent_death_signal,
            )
        finally:
            for write in write_fds.values():
                os.close(write)
    with open(console_log, "wb") as console_file:
        console_sinks: list[BinaryIO] = [console_file]
        if echo_console:
            console_sinks.append(sys.stderr.buffer)
        outcome = watch(process, control, limits, clock, console_sinks, pipes)
    elapsed = time.monotonic() - clock

    if outcome == "timeout":
        log(f"timed out after {limits.timeout:g} s; kernel console: {console_log}")
        return EXIT_TIMEOUT
    if outcome == "boot-timeout":
        log(f"boot failure: no command start within {limits.boot_timeout:g} s")
        show_boot_logs(console_log, qemu_log)
        return EXIT_VM_FAILURE
    if not control.started.is_set():
        log(f"boot failure: QEMU exited with status {process.returncode} before the command ran")
        show_boot_logs(console_log, qemu_log)
        return EXIT_VM_FAILURE
    report_kernel_trouble(console_log)
    if control.exit_status is None:
        log("VM failure: the VM stopped before reporting the command's exit status")
        show_boot_logs(console_log, qemu_log)
        return EXIT_VM_FAILURE
    log(f"command exited with status {control.exit_status} ({elapsed:.1f} s in the VM)")
    return control.exit_status


def show_boot_logs(console_log: Path, qemu_log: Path) -> None:
    for title, path in (("kernel console", console_log), ("QEMU", qemu_log)):
        text = tail(path, 40)
        if text:
            print(f"--- {title} ({path}), last lines:\n{text}", file=sys.stderr)


def prune_old_runs(runs_dir: Path, max_age_seconds: float = 86400) -> None:
    if not runs_dir.is_dir():
        return
    now = time.time()
    for entry in runs_dir.iterdir():
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > max_age_seconds:
                shutil.rmtree(entry)


# ------------------------------------------------------------------------ cli


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="tests/vm/runner.py",
        usage="%(prog)s [options] -- CMD ARGS...",
        description="Run CMD as root inside a QEMU (TCG) VM with kernel NBD support.",
        epilog=f"Exit status: CMD's status; {EXIT_TIMEOUT} on --timeout; "
        f"{EXIT_VM_FAILURE} when the VM cannot be prepared or fails to boot or run.",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="whole VM run, seconds")
    parser.add_argument(
        "--boot-timeout", type=float, default=300.0, help="until the command starts, seconds"
    )
    parser.add_argument("--mem", type=int, default=2048, help="guest memory, MiB")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="pass a host variable (or set one) in the command's environment",
    )
    parser.add_argument(
        "--forward",
        action="append",
        default=[],
        type=parse_forward,
        metavar="GUEST_PORT:HOST_PORT",
        help=f"the guest's {GUEST_FORWARD_ADDRESS}:GUEST_PORT reaches the host's "
        "127.0.0.1:HOST_PORT (gives the guest a network card; nothing else is reachable)",
    )
    parser.add_argument(
        "--host-forward",
        action="append",
        default=[],
        type=parse_forward,
        metavar="HOST_PORT:GUEST_PORT",
        help="the host's 127.0.0.1:HOST_PORT reaches the guest's GUEST_PORT",
    )
    parser.add_argument(
        "--disk",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a raw disk image the guest sees as /dev/vdX, in the order given",
    )
    parser.add_argument("--cwd", help="working directory in the guest (default: the current one)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="install packages and build the cache only"
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="show the full kernel console on stderr (debugging boot problems)",
    )
    parser.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="append ARG to the guest kernel's command line",
    )
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    if not command and not args.prepare_only:
        parser.error("no command: put it after `--`")
    if args.timeout <= 0 or args.boot_timeout <= 0 or args.mem < 256 or args.smp < 1:
        parser.error("--timeout and --boot-timeout must be positive, --mem >= 256, --smp >= 1")
    return args, command


def main(argv: Sequence[str]) -> int:
    args, command = parse_args(argv)
    cwd = os.path.abspath(args.cwd) if args.cwd else os.getcwd()
    try:
        check_guest_cwd(cwd)
        venv_bin = REPO_ROOT / ".venv" / "bin"
        env = guest_environment(args.env, os.environ, venv_bin if venv_bin.is_dir() else None)
    except ValueError as exc:
        log(str(exc))
        return 2
    try:
        if os.geteuid() != 0:
            raise VmError("must run as root (apt-get, and QEMU's 9p passthrough of the host root)")
        if any(char.isspace() for char in str(REPO_ROOT)):
            raise VmError(f"the repository path {REPO_ROOT!s} contains whitespace")
        prepared = prepare()
        if args.prepare_only:
            log(f"kernel {prepared.boot_image}, initramfs {prepared.initramfs}")
            return 0
        runs_dir = RUNS_DIR
        prune_old_runs(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir = runs_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        run_dir.mkdir()
        (run_dir / "guest.conf").write_text(guest_config(prepared.kernel))
        (run_dir / "command.sh").write_text(command_script(command, cwd, env))
        spec = VmSpec(
            kernel=prepared.boot_image,
            initrd=prepared.initramfs,
            memory_mib=args.mem,
            cpus=args.smp,
            run_dir=run_dir,
            share_venv=venv_bin.is_dir(),
            kernel_console_quiet=not args.console,
            extra_append=tuple(args.kernel_arg),
            forwards=tuple(args.forward),
            host_forwards=tuple(args.host_forward),
            disks=tuple(path.resolve() for path in args.disk),
        )
        status = run_vm(spec, Limits(args.timeout, args.boot_timeout), args.console)
    except VmError as exc:
        log(f"VM failure: {exc}")
        return EXIT_VM_FAILURE
    if status == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        log(f"logs kept in {run_dir}")
    return status


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    # Once: a second signal (timeout(1) and a shell both passing one on) must not cut
    # the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def exit_through_clean_up(
    main: Callable[[list[str]], int], say: Callable[[str], None] = log
) -> NoReturn:
    """Runs ``main`` on the command line's arguments and exits with its status; SIGTERM
    (e.g. from CI) takes ^C's way out, through every clean-up (QEMU stopped, child
    processes in sessions of their own ended)."""
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    exit_through_clean_up(main)
