"""Host tests of the microVM runner's pure parts (tests/vm/runner.py is a script, not a package)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUNNER_PATH = Path(__file__).resolve().parents[1] / "vm" / "runner.py"


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vm_runner", RUNNER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


runner = load_runner()

APT_CACHE_SHOW = """\
Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Installed-Size: 14
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Description-en: Linux for 64-bit PCs (meta-package)
"""


def test_kernel_dependency_is_read_from_the_meta_package() -> None:
    package = runner.parse_kernel_dependency(APT_CACHE_SHOW)
    assert package == runner.KernelPackage("linux-image-6.1.0-56-amd64", "6.1.192-2")
    assert package.cache_name == "linux-image-6.1.0-56-amd64_6.1.192-2"


def test_kernel_dependency_skips_unversioned_and_other_clauses() -> None:
    output = (
        "Depends: initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-amd64 (= 6.12.9-1)\n"
    )
    assert runner.parse_kernel_dependency(output).name == "linux-image-6.12.9-amd64"


@pytest.mark.parametrize("output", ["", "Depends: linux-image-6.1.0-56-amd64\n", "Package: x\n"])
def test_kernel_dependency_missing_is_a_vm_error(output: str) -> None:
    with pytest.raises(runner.VmError, match="versioned linux-image"):
        runner.parse_kernel_dependency(output)


def test_installed_packages_need_the_ii_status() -> None:
    output = "qemu-system-x86 ii \nfio un \nkmod ii \nudev rc \n"
    assert runner.parse_installed_packages(output) == {"qemu-system-x86", "kmod"}


def test_show_depends_becomes_relative_unique_lines_with_parameters(tmp_path: Path) -> None:
    modules_dir = tmp_path / "lib" / "modules" / "6.1.0-56-amd64"
    kernel = modules_dir / "kernel"
    output = "\n".join(
        [
            f"insmod {kernel}/drivers/virtio/virtio_ring.ko ",
            f"insmod {kernel}/drivers/virtio/virtio.ko ",
            "builtin crc32c",
            f"insmod {kernel}/drivers/virtio/virtio_ring.ko ",
            f"insmod {kernel}/drivers/block/nbd.ko nbds_max=128 max_part=0",
        ]
    )
    assert runner.parse_show_depends(output, modules_dir) == [
        "lib/modules/6.1.0-56-amd64/kernel/drivers/virtio/virtio_ring.ko",
        "lib/modules/6.1.0-56-amd64/kernel/drivers/virtio/virtio.ko",
        "lib/modules/6.1.0-56-amd64/kernel/drivers/block/nbd.ko nbds_max=128 max_part=0",
    ]


def test_show_depends_refuses_modules_outside_the_tree(tmp_path: Path) -> None:
    modules_dir = tmp_path / "lib" / "modules" / "6.1.0-56-amd64"
    with pytest.raises(runner.VmError, match="outside"):
        runner.parse_show_depends("insmod /lib/modules/6.1/kernel/x.ko\n", modules_dir)
    with pytest.raises(runner.VmError, match="unexpected"):
        runner.parse_show_depends("rmmod x\n", modules_dir)


def read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """An independent reader of the newc format: (name, mode, data, rdev) per member."""
    members: list[tuple[str, int, bytes, tuple[int, int]]] = []
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        assert archive[name_start + name_size - 1] == 0
        data_start = (name_start + name_size + 3) & ~3
        data = archive[data_start : data_start + file_size]
        offset = (data_start + file_size + 3) & ~3
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return members
        members.append((name, fields[1], data, (fields[9], fields[10])))


def test_newc_archive_round_trips_files_directories_links_and_devices() -> None:
    entries = [
        runner.ArchiveEntry("dev", runner.S_IFDIR | 0o755),
        runner.ArchiveEntry("dev/console", runner.S_IFCHR | 0o600, rdev=(5, 1)),
        runner.ArchiveEntry("bin/sh", runner.S_IFLNK | 0o777, b"busybox"),
        runner.ArchiveEntry("init", runner.S_IFREG | 0o755, b"#!/bin/sh\necho odd-length\n"),
        runner.ArchiveEntry("empty", runner.S_IFREG | 0o644),
    ]
    archive = runner.newc_archive(entries)
    assert len(archive) % 4 == 0
    assert read_newc(archive) == [
        ("dev", runner.S_IFDIR | 0o755, b"", (0, 0)),
        ("dev/console", runner.S_IFCHR | 0o600, b"", (5, 1)),
        ("bin/sh", runner.S_IFLNK | 0o777, b"busybox", (0, 0)),
        ("init", runner.S_IFREG | 0o755, b"#!/bin/sh\necho odd-length\n", (0, 0)),
        ("empty", runner.S_IFREG | 0o644, b"", (0, 0)),
    ]
    # Deterministic: the cache key relies on equal inputs giving equal bytes.
    assert runner.newc_archive(entries) == archive


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_newc_archive_is_read_by_gnu_cpio() -> None:
    archive = runner.newc_archive(
        [
            runner.ArchiveEntry("etc", runner.S_IFDIR | 0o755),
            runner.ArchiveEntry("etc/initramfs-modules", runner.S_IFREG | 0o644, b"a.ko\n"),
        ]
    )
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["etc", "etc/initramfs-modules"]


def fake_bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x40) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    protected_mode = b"\x90" * payload_offset + payload + struct.pack("<I", 12345)
    return bytes(setup) + protected_mode


ELF = b"\x7fELF" + bytes(range(256)) * 64


def test_uncompressed_kernel_from_xz_and_gzip_payloads() -> None:
    assert runner.uncompressed_kernel(fake_bzimage(lzma.compress(ELF))) == ELF
    assert runner.uncompressed_kernel(fake_bzimage(gzip.compress(ELF), setup_sects=30)) == ELF


def test_uncompressed_kernel_declines_what_it_cannot_boot() -> None:
    zstd_frame = b"\x28\xb5\x2f\xfd" + b"\0" * 64
    assert runner.uncompressed_kernel(fake_bzimage(zstd_frame)) is None
    assert runner.uncompressed_kernel(fake_bzimage(lzma.compress(b"not an elf"))) is None
    assert runner.uncompressed_kernel(b"MZ" + b"\0" * 4096) is None


def test_guest_environment_base_and_passthrough() -> None:
    host = {"KUBEBUILDER_ASSETS": "/opt/k8s", "SECRET": "never"}
    env = runner.guest_environment(
        ["KUBEBUILDER_ASSETS", "UNSET_ON_HOST", "MODE=fast"], host, Path("/repo/.venv/bin")
    )
    assert env["PATH"].startswith("/repo/.venv/bin:/usr/local/sbin:")
    assert env["KUBEBUILDER_ASSETS"] == "/opt/k8s"
    assert env["MODE"] == "fast"
    assert "UNSET_ON_HOST" not in env
    assert "SECRET" not in env
    assert env["HOME"] == "/tmp"
    assert runner.guest_environment([], host, None)["PATH"] == runner.GUEST_BASE_PATH


@pytest.mark.parametrize("spec", ["1ABC", "A-B", "", "=x"])
def test_guest_environment_rejects_bad_names(spec: str) -> None:
    with pytest.raises(ValueError, match="not a valid variable name"):
        runner.guest_environment([spec], {}, None)


def test_command_script_preserves_arguments_cwd_and_environment(tmp_path: Path) -> None:
    workdir = tmp_path / "dir with space"
    workdir.mkdir()
    argv = [
        sys.executable,
        "-c",
        "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), os.environ['X']]))",
        "it's",
        '"$HOME"',
        "a b\nc",
        "",
    ]
    script = tmp_path / "command.sh"
    script.write_text(runner.command_script(argv, str(workdir), {"X": "$(touch /nope) 'q'"}))
    completed = subprocess.run(
        ["env", "-i", "/bin/sh", str(script)], capture_output=True, text=True, check=True
    )
    assert json.loads(completed.stdout) == [argv[3:], str(workdir), "$(touch /nope) 'q'"]


def test_command_script_reports_a_missing_cwd_as_a_vm_failure(tmp_path: Path) -> None:
    script = tmp_path / "command.sh"
    script.write_text(runner.command_script(["true"], str(tmp_path / "gone"), {}))
    completed = subprocess.run(["env", "-i", "/bin/sh", str(script)], capture_output=True)
    assert completed.returncode == runner.EXIT_VM_FAILURE


def test_guest_cwd_must_be_visible_in_the_guest() -> None:
    runner.check_guest_cwd(str(runner.REPO_ROOT))
    runner.check_guest_cwd(str(runner.REPO_ROOT / "tests"))
    runner.check_guest_cwd("/usr/share")
    for hidden in ("/tmp/work", "/run/x", "/var/tmp", "relative/dir"):
        with pytest.raises(ValueError):
            runner.check_guest_cwd(hidden)


def test_control_lines() -> None:
    assert runner.parse_control_line("started") == ("started", None)
    assert runner.parse_control_line("exit 0") == ("exit", 0)
    assert runner.parse_control_line("exit 255") == ("exit", 255)
    for bad in ("exit 256", "exit -1", "exit", "stared", "exit 3 4"):
        with pytest.raises(ValueError):
            runner.parse_control_line(bad)


def test_control_reads_messages_split_across_writes() -> None:
    control = runner.Control(started_clock=0.0)
    read_end, write_end = os.pipe()
    os.write(write_end, b"star")
    os.write(write_end, b"ted\nexi")
    os.write(write_end, b"t 3\n")
    os.close(write_end)
    control.read(read_end)
    assert control.started.is_set()
    assert control.boot_seconds is not None and control.boot_seconds > 0
    assert control.exit_status == 3


def test_pump_keeps_draining_after_a_sink_breaks() -> None:
    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            return None

    class Collect:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> int:
            self.data += data
            return len(data)

        def flush(self) -> None:
            return None

    collect = Collect()
    read_end, write_end = os.pipe()
    os.write(write_end, b"one ")
    os.write(write_end, b"two")
    os.close(write_end)
    runner.pump(read_end, [Broken(), collect])
    assert collect.data == b"one two"


def spec(tmp_path: Path, share_venv: bool) -> object:
    return runner.VmSpec(
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initramfs.cpio"),
        memory_mib=1024,
        cpus=2,
        run_dir=tmp_path,
        share_venv=share_venv,
        extra_append=("initcall_debug",),
    )


def test_qemu_command_line(tmp_path: Path) -> None:
    fds = {"console": 10, "stdout": 11, "stderr": 12, "control": 13}
    argv = runner.qemu_command(spec(tmp_path, share_venv=False), fds)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-m") + 1] == "1024"
    assert "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on" in joined
    assert f"local,path={runner.REPO_ROOT},mount_tag=worktree" in joined
    assert "mount_tag=venv" not in joined
    assert "file,id=stdout,path=/dev/fd/11" in joined
    assert "virtserialport,bus=ports.0,chardev=control,name=zerofs_vm.control" in joined
    append = argv[argv.index("-append") + 1].split()
    assert "console=ttyS0" in append and "panic=-1" in append and "quiet" in append
    assert f"zerofs_vm.run={tmp_path}" in append
    assert f"zerofs_vm.init={runner.REPO_ROOT}/tests/vm/guest_init.sh" in append
    assert append[-1] == "initcall_debug"
    with_venv = runner.qemu_command(spec(tmp_path, share_venv=True), fds)
    assert f"local,path={runner.REPO_ROOT / '.venv'},mount_tag=venv" in " ".join(with_venv)
    assert "zerofs_vm.venv=venv" not in append
    assert "zerofs_vm.venv=venv" in with_venv[with_venv.index("-append") + 1].split()


def test_arguments_split_at_the_double_dash() -> None:
    args, command = runner.parse_args(["--smp", "1", "--env", "A", "--", "pytest", "--", "-x"])
    assert (args.smp, args.env, command) == (1, ["A"], ["pytest", "--", "-x"])
    args, command = runner.parse_args(["--prepare-only"])
    assert args.prepare_only and command == []
    with pytest.raises(SystemExit):
        runner.parse_args(["--timeout", "5"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--timeout", "0", "--", "true"])


# A script's main whose clean-up takes a while after ^C or SIGTERM, as stopping QEMU or
# the cluster's control plane does.
SLOW_CLEAN_UP = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("vm_runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
sys.modules["vm_runner"] = runner
spec.loader.exec_module(runner)

def main(argv):
    try:
        print("running", flush=True)
        time.sleep(60)
        return 0
    finally:
        print("cleaning up", flush=True)
        time.sleep(1.5)
        print("cleaned up", flush=True)

runner.exit_through_clean_up(main)
"""


def test_sigterm_takes_the_clean_up_path_and_a_second_one_does_not_cut_it_short() -> None:
    script = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLEAN_UP, str(RUNNER_PATH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert script.stdout is not None
    assert script.stdout.readline() == "running\n"
    script.terminate()
    assert script.stdout.readline() == "cleaning up\n"
    script.terminate()  # as timeout(1) and a shell both passing the signal on
    out, err = script.communicate(timeout=30)
    assert out == "cleaned up\n", err
    assert script.returncode == 130
    assert "interrupted" in err
