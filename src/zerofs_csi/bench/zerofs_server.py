"""Which per-volume server the tests, the demo, the benchmarks and the harnesses start.

A real ZeroFS when there is one: the binary named by ``ZEROFS_BIN``, else ``zerofs`` on
PATH. Otherwise the stand-in of the checkout (``tools/zerofs-standin``: nbdkit + diod),
which serves what the driver uses of ZeroFS where no ZeroFS binary is built. Every
report says which of the two ran, with the real server's version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_ZEROFS_BIN = "ZEROFS_BIN"
# Present in a checkout (an installed wheel has no tools/); the last choice.
CHECKOUT_STANDIN = Path(__file__).resolve().parents[3] / "tools" / "zerofs-standin"
VERSION_TIMEOUT_S = 30.0


class ServerNotFound(Exception):
    """No per-volume server can be run: ZEROFS_BIN names no executable, or there is
    neither ZeroFS nor a stand-in."""


@dataclass(frozen=True)
class ZeroFSServer:
    """The per-volume server command and what it is."""

    command: str
    real: bool  # ZeroFS itself, not the stand-in
    version: str  # ``zerofs --version``'s line for ZeroFS, "stand-in" for the stand-in

    def describe(self) -> str:
        if self.real:
            return f"ZeroFS ({self.version}, {self.command})"
        return f"the ZeroFS stand-in ({self.command}: nbdkit + diod)"


def choose_command(
    environ: Mapping[str, str], search_path: str | None, standin: Path | None
) -> tuple[str, bool]:
    """(command, is it ZeroFS) from the environment, the PATH and the stand-in, if any.

    An explicit ``ZEROFS_BIN`` that is not an executable is an error rather than a
    quiet fall-back to the stand-in: a run asked for ZeroFS must not report the
    stand-in's results as ZeroFS's.
    """
    named = environ.get(ENV_ZEROFS_BIN, "")
    if named:
        path = Path(named)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerNotFound(f"{ENV_ZEROFS_BIN}={named} is not an executable file")
        return str(path.resolve()), True
    found = shutil.which("zerofs", path=search_path)
    if found is not None:
        return str(Path(found).resolve()), True
    if standin is not None and standin.is_file():
        return str(standin), False
    raise ServerNotFound(
        f"no ZeroFS ({ENV_ZEROFS_BIN} unset, no zerofs on PATH) and no stand-in "
        "(tools/zerofs-standin of a checkout)"
    )


def server_version(command: str) -> str:
    """``COMMAND --version``'s first line (ZeroFS prints ``zerofs X.Y.Z``)."""
    try:
        done = subprocess.run(
            [command, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerNotFound(f"{command} --version failed: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise ServerNotFound(f"{command} --version printed nothing")
    return lines[0]


def zerofs_server(
    environ: Mapping[str, str] | None = None, standin: Path | None = CHECKOUT_STANDIN
) -> ZeroFSServer:
    """The server to run here (see the module's docstring)."""
    environment = os.environ if environ is None else environ
    command, real = choose_command(environment, environment.get("PATH"), standin)
    return ZeroFSServer(command, real, server_version(command) if real else "stand-in")
