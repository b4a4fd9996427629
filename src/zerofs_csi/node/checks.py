"""Start-up checks of what the node role needs from the host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from zerofs_csi.observability.readiness import Check


def nbd_module_problem(sys_root: Path = Path("/sys")) -> str | None:
    # /sys/module/nbd exists whether nbd is built in or loaded as a module.
    if not (sys_root / "module" / "nbd").is_dir():
        return (
            "the kernel's nbd driver is not loaded: run `modprobe nbd nbds_max=128 max_part=0` "
            "on the node (or enable the chart's nbd init container)"
        )
    return None


def privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "the node plugin must run as root (privileged) to attach NBD devices and mount"
    return None


def mkfs_problem(filesystems: tuple[str, ...] = ("ext4",)) -> str | None:
    missing = [fs for fs in filesystems if shutil.which(f"mkfs.{fs}") is None]
    if missing:
        tools = ", ".join(f"mkfs.{fs}" for fs in missing)
        return f"{tools} not found on PATH: install the filesystem tools in the plugin image"
    return None


def node_checks() -> list[Check]:
    return [
        Check("privileges", privilege_problem),
        Check("nbd_module", nbd_module_problem),
        Check("mkfs", mkfs_problem),
    ]
