"""csi-sanity, the CSI project's conformance suite (kubernetes-csi/csi-test), against the plugin.

    python tools/harness/sanity.py --run controller|all --csi-sanity PATH

PATH is the binary the Makefile builds, ``<cache>/csi-sanity/<csi-test release>/csi-sanity``
(``<cache>``: what tools/cache-dir prints).

``--run controller`` (``make sanity-controller``, on any host): the controller role
(``--role controller``, local backend) on csi-sanity's controller endpoint, and the
specs of the controller service. Those publishing a volume take the node id from
NodeGetInfo, and csi-sanity's clean-up unpublishes and unstages every volume it made on
the node endpoint, staged or not: a node-role plugin with the same ``--node-id`` answers
there, and since none of these volumes is ever staged it needs no kernel NBD.

``--run all`` (``make sanity-vm``, in the microVM: it needs the kernel's NBD driver and
root): one plugin serving every service (``--role all``, local backend, the ZeroFS
stand-in as its server). Both runs set ``--max-volumes-per-node`` and enable
csi-sanity's attach limit spec. The snapshot, restore and clone specs are left to the
controller run: they run the same controller code with the same local backend, and the
short-lived servers they start take minutes under TCG. Every other skip is csi-sanity's
own, for a capability the plugin does not claim. ("should work if node-expand is called
after node-publish" passes although expansion is offline: like kubelet expanding on
mount, it asks with the one publication at volume_path that nothing uses, see README.)

The plugin is started exactly as the node tests start it (``PluginProcess`` of
tests/privileged/conftest.py). The run fails on any failed spec; it prints the totals
(passed, failed, skipped), the time it took, and the specs that failed with the plugin
log's tail. JUnit results go to ``build/sanity/<run>.xml``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, plugin_process  # noqa: E402

from zerofs_csi.bench.plugin import SECRETS, stop_plugin  # noqa: E402

RESULTS_DIR = REPO / "build" / "sanity"
# The attach limit of both runs: small, so that the attach limit spec stays quick.
ATTACH_LIMIT = 3
# Sizes csi-sanity asks for: small volumes make each stage's mkfs quick under TCG.
VOLUME_BYTES = 64 << 20
EXPANDED_BYTES = 128 << 20
# The specs the full run leaves to the controller run (see the module docstring).
CONTROLLER_RUN_ONLY = r"[Ss]napshot|source volume"
# For the whole suite: csi-sanity's default of one hour is tight for the full run under TCG.
SUITE_TIMEOUT = "2h"
# csi-sanity skips these when the run is set up wrong, not for a capability the plugin
# does not claim: the full run must not see them.
MISCONFIGURED_SKIPS = ("testnodevolumeattachlimit not enabled", "No MaxVolumesPerNode")


@dataclass
class Totals:
    """The specs of one run by outcome; ``skipped`` maps a spec to csi-sanity's reason
    (a capability the plugin does not claim), ``deselected`` are those the run's focus
    or skip left out, ``pending`` those csi-sanity itself disables."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    deselected: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} "
            f"skipped by csi-sanity (capabilities not claimed); {len(self.deselected)} not "
            f"selected, {len(self.pending)} pending"
        )


def read_junit(path: Path) -> Totals:
    """Every spec of a Ginkgo JUnit report by outcome."""
    totals = Totals()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if not name.startswith("[It]"):
            continue  # suite set-up and tear-down nodes
        name = name.removeprefix("[It] ")
        status = case.get("status", "")
        skipped = case.find("skipped")
        reason = (skipped.get("message", "") if skipped is not None else "").removeprefix("skipped")
        if status == "passed":
            totals.passed.append(name)
        elif status == "pending":
            totals.pending.append(name)
        elif status == "skipped" and reason:
            totals.skipped[name] = reason.removeprefix(" - ")
        elif status == "skipped":
            totals.deselected.append(name)
        else:
            failure = case.find("failure")
            message = failure.get("message", "") if failure is not None else status
            totals.failed.append(f"{name}: {message.splitlines()[0] if message else status}")
    return totals


def problems(totals: Totals, run: str) -> list[str]:
    """What makes the run fail: failed specs, and in the full run any spec left out
    other than the one offline expansion excludes, or skipped for a wrong set-up."""
    found = [f"FAILED: {name}" for name in totals.failed]
    found += [
        f"SKIPPED ({reason}): {name}"
        for name, reason in totals.skipped.items()
        if reason.startswith(MISCONFIGURED_SKIPS)
    ]
    if run == "all":
        found += [
            f"NOT SELECTED: {name}"
            for name in totals.deselected
            if not re.search(CONTROLLER_RUN_ONLY, name)
        ]
    if not totals.passed:
        found.append("no spec passed")
    return found


def write_yaml(path: Path, values: dict[str, object]) -> Path:
    """A YAML file of string keys and values (JSON is YAML, and needs no library)."""
    path.write_text(json.dumps(values, indent=1) + "\n")
    return path


def sanity_command(
    binary: Path, workdir: Path, node_socket: Path, controller_socket: Path, run: str
) -> list[str]:
    parameters = write_yaml(
        workdir / "parameters.yaml",
        {"storageUrl": f"file://{workdir / 'store'}", "filesystem": "ext4"},
    )
    # Stage needs the encryption password, and so do the snapshot calls and a CreateVolume
    # from a snapshot, which start short-lived servers of volumes staged nowhere; no other
    # call of these specs needs one.
    secrets = write_yaml(
        workdir / "secrets.yaml",
        {
            "NodeStageVolumeSecret": SECRETS,
            "CreateVolumeSecret": SECRETS,
            "CreateSnapshotSecret": SECRETS,
            "DeleteSnapshotSecret": SECRETS,
        },
    )
    junit = RESULTS_DIR / f"{run}.xml"
    command = [
        str(binary),
        f"--csi.endpoint=unix://{node_socket}",
        f"--csi.controllerendpoint=unix://{controller_socket}",
        f"--csi.mountdir={workdir / 'target'}",
        f"--csi.stagingdir={workdir / 'staging'}",
        f"--csi.testvolumeparameters={parameters}",
        f"--csi.secrets={secrets}",
        f"--csi.testvolumesize={VOLUME_BYTES}",
        f"--csi.testvolumeexpandsize={EXPANDED_BYTES}",
        f"--ginkgo.junit-report={junit}",
        f"--ginkgo.timeout={SUITE_TIMEOUT}",
        "--ginkgo.no-color",
        "--csi.testnodevolumeattachlimit",
    ]
    if run == "controller":
        command.append(r"--ginkgo.focus=\[Controller Server\]")
    else:
        command.append(f"--ginkgo.skip={CONTROLLER_RUN_ONLY}")
    return command


def run_sanity(run: str, binary: Path) -> int:
    if not binary.is_file():
        print(f"{binary} is missing: `make csi-sanity` builds it", file=sys.stderr)
        return 2
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="zerofs-sanity-"))
    (workdir / "store").mkdir()
    plugins = []
    # The node reports the limit (NodeGetInfo), the local controller enforces its own.
    limit = ("--max-volumes-per-node", str(ATTACH_LIMIT))
    try:
        if run == "controller":
            controller = plugin_process(
                workdir / "controller", extra_args=("--role", "controller", *limit)
            )
            node = plugin_process(workdir / "node", extra_args=("--role", "node", *limit))
            plugins += [controller, node]
            controller.start()
            # Its start-up checks need the kernel's NBD driver, which this host may lack:
            # not waited for, NodeGetInfo does not depend on them.
            node.start(wait_ready=False)
        else:
            controller = node = plugin_process(workdir / "plugin", extra_args=limit)
            plugins.append(controller)
            controller.start()
        command = sanity_command(binary, workdir, node.socket_path, controller.socket_path, run)
        print("$ " + " ".join(command), flush=True)
        started = time.monotonic()
        finished = subprocess.run(command, cwd=workdir, check=False)
        elapsed = time.monotonic() - started
        totals = read_junit(RESULTS_DIR / f"{run}.xml")
        release = binary.parent.name
        print(f"\ncsi-sanity {release}, {run} run: {totals.line()} in {elapsed:.1f} s")
        found = problems(totals, run)
        if found or finished.returncode != 0:
            print("\n".join(found))
            for plugin in plugins:
                print(f"\n---- {plugin.log_path} (tail) ----\n{plugin.log_tail(120)}")
            return 1
        return 0
    finally:
        for plugin in plugins:
            stop_plugin(plugin)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        choices=("controller", "all"),
        required=True,
        help="controller: the controller role on this host; all: every service (needs NBD)",
    )
    parser.add_argument("--csi-sanity", type=Path, required=True, help="the binary")
    args = parser.parse_args()
    return run_sanity(args.run, args.csi_sanity.resolve())


if __name__ == "__main__":
    sys.exit(main())
