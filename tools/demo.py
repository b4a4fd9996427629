"""The main job, end to end: one volume's whole life through the CSI gRPC API.

Starts the plugin (both roles, local backend) with a real ZeroFS (`ZEROFS_BIN`, else
`zerofs` on PATH), else the stand-in (nbdkit + diod over the same config), then: CreateVolume,
ControllerPublish, NodeStage (fresh: mkfs), NodePublish, write and checksum data,
unpublish, unstage, stage again, verify the checksum, expand (offline: unpublished,
still staged), and delete. Prints a table of every step's time; a failing step stops
the run with its error.

Needs the kernel's NBD driver and root: run it through `make demo` (the microVM).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from zerofs_csi.bench.zerofs_server import zerofs_server
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "s3"))

from minio_server import volume_store  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
NODE = "demo-node"


class StepFailed(Exception):
    pass


class Demo:
    def __init__(self, workdir: Path, data_mib: int) -> None:
        self.workdir = workdir
        self.data_mib = data_mib
        self.rows: list[tuple[str, float, str]] = []
        self.socket = workdir / "csi.sock"
        self.plugin: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "plugin.log"
        self.server = zerofs_server()
        self.zerofs = self.server.command

    def step(self, name: str, action: Callable[[], Any], detail: str = "") -> Any:
        start = time.monotonic()
        try:
            result = action()
        except grpc.RpcError as exc:
            self.rows.append((name, time.monotonic() - start, "FAILED"))
            raise StepFailed(f"{name}: {exc.code().name}: {exc.details()}") from None
        except Exception as exc:
            self.rows.append((name, time.monotonic() - start, "FAILED"))
            raise StepFailed(f"{name}: {type(exc).__name__}: {exc}") from None
        self.rows.append((name, time.monotonic() - start, detail or "ok"))
        return result

    def start_plugin(self) -> None:
        args = [
            sys.executable, "-m", "zerofs_csi",
            "--role", "all", "--backend", "local", "--node-id", NODE,
            "--endpoint", f"unix://{self.socket}",
            "--state-dir", str(self.workdir / "state"),
            "--zerofs-command", self.zerofs,
            "--metrics-address", "",
            "--log-format", "text",
        ]  # fmt: skip
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (lives as long as the plugin)
        self.plugin = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.plugin.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"plugin did not start; see {self.log_path}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        while not self.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value:
            if time.monotonic() > deadline:
                raise RuntimeError("plugin never became ready")
            time.sleep(0.02)

    def stop_plugin(self) -> None:
        if self.plugin is not None and self.plugin.poll() is None:
            self.plugin.send_signal(signal.SIGTERM)
            try:
                self.plugin.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.plugin.kill()
                self.plugin.wait()

    def run(self) -> None:
        store = self.workdir / "store"
        store.mkdir()
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=["noatime"]),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        secrets = {"ZEROFS_ENCRYPTION_PASSWORD": "demo-encryption-password"}
        # ZeroFS refuses file:// storage (no conditional put): its volume goes to MinIO.
        placement = {"storageUrl": f"file://{store}"}
        s3 = volume_store(self.server)
        if s3 is not None:
            placement = s3.parameters("demo")
            secrets.update(s3.secrets())
        staging = str(self.workdir / "kubelet" / "staging" / "pvc-demo")
        target = str(self.workdir / "kubelet" / "pods" / "demo-pod" / "volume")
        data_file = Path(target) / "data.bin"

        self.step(
            "start plugin (both roles)", self.start_plugin, f"server: {Path(self.zerofs).name}"
        )
        created = self.step(
            "CreateVolume 1 GiB",
            lambda: self.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-demo",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
                    volume_capabilities=[capability],
                    parameters={**placement, "filesystem": "ext4"},
                    secrets=secrets,
                ),
                timeout=120,
            ),
        )
        volume = created.volume
        vid = volume.volume_id

        def publish_controller() -> Any:
            return self.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=vid, node_id=NODE, volume_capability=capability,
                    volume_context=volume.volume_context,
                ),
                timeout=60,
            )  # fmt: skip

        def stage() -> Any:
            return self.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=vid, staging_target_path=staging, volume_capability=capability,
                    volume_context=volume.volume_context, secrets=secrets,
                ),
                timeout=300,
            )  # fmt: skip

        def publish() -> Any:
            return self.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid, staging_target_path=staging, target_path=target,
                    volume_capability=capability, volume_context=volume.volume_context,
                ),
                timeout=60,
            )  # fmt: skip

        def unpublish_and_unstage(label: str) -> None:
            self.step(
                f"NodeUnpublish ({label})",
                lambda: self.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
                    timeout=60,
                ),
            )
            self.step(
                f"NodeUnstage ({label})",
                lambda: self.node.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
                    timeout=300,
                ),
            )
            self.step(
                f"ControllerUnpublish ({label})",
                lambda: self.controller.ControllerUnpublishVolume(
                    csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE),
                    timeout=60,
                ),
            )

        self.step("ControllerPublish", publish_controller)
        self.step("NodeStage (fresh: mkfs)", stage)
        self.step("NodePublish", publish)
        digest = self.step(
            f"write {self.data_mib} MiB + fsync", lambda: write_data(data_file, self.data_mib)
        )
        unpublish_and_unstage("first")

        self.step("ControllerPublish again", publish_controller)
        self.step("NodeStage (existing filesystem)", stage)
        self.step("NodePublish again", publish)
        self.step(
            "read back and verify", lambda: verify_data(data_file, digest), f"sha256 {digest[:12]}"
        )

        expanded = self.step(
            "ControllerExpand to 2 GiB",
            lambda: self.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vid,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
                    volume_capability=capability,
                ),
                timeout=60,
            ),
        )
        # Expansion is offline: the pod stops using the volume, the node grows it staged.
        self.step(
            "NodeUnpublish (for expansion)",
            lambda: self.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
                timeout=60,
            ),
        )
        self.step(
            "NodeExpand (offline)",
            lambda: self.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=vid,
                    volume_path=staging,
                    staging_target_path=staging,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=expanded.capacity_bytes),
                    volume_capability=capability,
                ),
                timeout=300,
            ),
        )
        self.step("NodePublish after expansion", publish)
        size = self.step("filesystem grew", lambda: filesystem_size(target, 1.5 * GiB))
        self.rows[-1] = (self.rows[-1][0], self.rows[-1][1], f"{size / GiB:.2f} GiB")
        self.step("verify after expansion", lambda: verify_data(data_file, digest))
        unpublish_and_unstage("final")
        self.step(
            "DeleteVolume",
            lambda: self.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=vid, secrets=secrets), timeout=120
            ),
        )
        leftover = [p for p in Path("/sys/block").glob("nbd*") if (p / "pid").exists()]
        self.step(
            "no device left attached",
            lambda: check(not leftover, f"still attached: {leftover}"),
        )

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'step':<{width}}  {'ms':>9}  result", f"{'-' * width}  {'-' * 9}  ------"]
        lines += [
            f"{name:<{width}}  {secs * 1000:9.1f}  {result}" for name, secs, result in self.rows
        ]
        total = sum(secs for _, secs, _ in self.rows)
        lines.append(f"{'total':<{width}}  {total * 1000:9.1f}")
        return "\n".join(lines)


def write_data(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def verify_data(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    check(digest.hexdigest() == expected, f"checksum mismatch: {digest.hexdigest()} != {expected}")


def filesystem_size(path: str, at_least: float) -> int:
    st = os.statvfs(path)
    size = st.f_blocks * st.f_frsize
    check(size >= at_least, f"filesystem is {size} bytes, expected at least {int(at_least)}")
    return size


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=64, help="data written and verified")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="zerofs-csi-demo-"))
    demo = Demo(workdir, args.data_mib)
    print(f"demo: server: {demo.server.describe()}", flush=True)
    status = 0
    try:
        demo.run()
    except StepFailed as exc:
        status = 1
        print(f"demo: FAILED at {exc}", file=sys.stderr)
    finally:
        demo.stop_plugin()
        print(demo.table())
        if status:
            print(f"--- last lines of the plugin log ({demo.log_path}) ---", file=sys.stderr)
            lines = demo.log_path.read_text(errors="replace").splitlines()[-30:]
            print("\n".join(lines), file=sys.stderr)
        if not args.keep and status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    if status == 0:
        print(
            "demo: OK: data written, unstaged, restaged, verified, expanded and deleted, "
            f"with {demo.server.describe()}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
