"""The choice of the per-volume server: ZEROFS_BIN, then zerofs on PATH, then the stand-in.

Every case runs against real files: executables written into the test's directory, a
PATH made of its directories, and the checkout's stand-in.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from zerofs_csi.bench.zerofs_server import (
    CHECKOUT_STANDIN,
    ServerNotFound,
    choose_command,
    zerofs_server,
)


def executable(path: Path, version: str = "zerofs 2.3.0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@dataclass(frozen=True)
class Case:
    name: str
    zerofs_bin: str | None  # "bin" (tmp/bin/zerofs-built), "missing", "plain", "" or unset
    on_path: bool  # tmp/path/zerofs exists and PATH holds tmp/path
    standin: bool  # the checkout's stand-in is offered
    expected: str | None  # "bin", "path", "standin", or None for ServerNotFound


CASES = [
    Case("ZEROFS_BIN wins over PATH", "bin", True, True, "bin"),
    Case("ZEROFS_BIN alone", "bin", False, False, "bin"),
    Case("zerofs on PATH wins over the stand-in", None, True, True, "path"),
    Case("an empty ZEROFS_BIN counts as unset", "", True, True, "path"),
    Case("the stand-in when there is no ZeroFS", None, False, True, "standin"),
    Case("nothing at all", None, False, False, None),
    Case("ZEROFS_BIN naming nothing never falls back", "missing", True, True, None),
    Case("ZEROFS_BIN naming a file that is not executable", "plain", True, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose_command(tmp_path: Path, case: Case) -> None:
    built = executable(tmp_path / "bin" / "zerofs-built")
    on_path = executable(tmp_path / "path" / "zerofs")
    plain = tmp_path / "plain"
    plain.write_text("not a program\n")
    named = {
        "bin": str(built),
        "missing": str(tmp_path / "absent"),
        "plain": str(plain),
        "": "",
    }
    environ = {} if case.zerofs_bin is None else {"ZEROFS_BIN": named[case.zerofs_bin]}
    search_path = str(on_path.parent) if case.on_path else str(tmp_path / "empty")
    standin = CHECKOUT_STANDIN if case.standin else None

    if case.expected is None:
        with pytest.raises(ServerNotFound):
            choose_command(environ, search_path, standin)
        return
    expected = {
        "bin": (str(built), True),
        "path": (str(on_path), True),
        "standin": (str(CHECKOUT_STANDIN), False),
    }[case.expected]
    assert choose_command(environ, search_path, standin) == expected


def test_real_server_reports_its_version(tmp_path: Path) -> None:
    built = executable(tmp_path / "zerofs", version="zerofs 2.3.0")
    server = zerofs_server({"ZEROFS_BIN": str(built), "PATH": ""})
    assert (server.command, server.real, server.version) == (str(built), True, "zerofs 2.3.0")
    assert server.describe() == f"ZeroFS (zerofs 2.3.0, {built})"


def test_stand_in_is_described_as_such() -> None:
    server = zerofs_server({"PATH": ""})
    assert (server.command, server.real) == (str(CHECKOUT_STANDIN), False)
    assert "stand-in" in server.describe()


def test_a_binary_that_cannot_say_its_version_is_refused(tmp_path: Path) -> None:
    failing = tmp_path / "zerofs"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(ServerNotFound, match="--version failed"):
        zerofs_server({"ZEROFS_BIN": str(failing), "PATH": ""})
