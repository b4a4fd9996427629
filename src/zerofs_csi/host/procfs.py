"""Facts about processes from /proc (proc(5)), read without exec."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from field 3 (state) on, or None if there is no PID.

    The command name (field 2) may hold spaces and parentheses, so the fields start after
    its last ')'.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 (starttime, clock ticks since boot): with the boot id, it tells a reused
    pid from the process that had it."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
