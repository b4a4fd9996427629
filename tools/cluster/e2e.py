#!/usr/bin/env python3
"""The user's whole path on the test cluster: the chart installed as the README says,
volumes written and verified across pods, expansion, faults under a writer, deletion of
the data, the validation chart's test, and an uninstall that leaves the node clean.

Runs on the host (tools/cluster/cluster.py run -- tools/cluster/e2e.py) with kubectl and
helm, as a user would; what only the node can see or do (the kernel log, NBD devices,
mounts, a server process to kill, an image to tag) goes through a privileged pod with
the node's PID namespace and root, as `kubectl debug node` gives. Each step is timed;
the table goes to stdout and to build/e2e.md. Any failed step ends the run with status
1, naming the step. ``--short`` is make test's part: the install, an ext4 volume written
and verified across pods, kill -9 of its server under a writer, its deletion from S3 and
the uninstall. The whole path takes a VolumeSnapshot under the writer too and restores
it into a new ReadOnlyMany claim, whose data as of the snapshot a pod verifies; it needs
the cluster's snapshot API (cluster.py --snapshot-api).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_archives import archive_tag

from zerofs_csi.bench import plugin

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HELM = REPO / "tools" / "helm.sh"
NAMESPACE = "zerofs-csi"
WORKLOAD_NAMESPACE = "e2e"
RELEASE = "zerofs-csi"
BUCKET = "zerofs-e2e"
# The claims' size, and the expanded claim's, whose filesystem must then hold at least
# GROWN_MIN_MIB. Small: a restore copies the whole expanded volume through two servers,
# under TCG, with the stand-in on S3 and a writer beside it, 12 % of 2 GiB took 15 minutes.
CLAIM_SIZE = "512Mi"
GROWN_SIZE = "1Gi"
GROWN_MIN_MIB = 900
SECRET = "zerofs-credentials"
DRIVER = "zerofs.csi.driver"
# The kernel's words for a failed or aborted volume; any of them after a step fails it.
KERNEL_ERRORS = re.compile(
    r"I/O error|Aborting journal|Remounting filesystem read-only|Suspicious reply|"
    r"Buffer I/O error|XFS .*(Corruption|Shutting down)"
)
KERNEL_STAMP = re.compile(r"\[\s*(\d+\.\d+)\]")
# Small: each 128 KiB the stand-in stores is one PUT, about 2.4 a second under TCG.
DATA_MIB = 16
# --short's (make test's): 32 PUTs a write instead of 128, about 40 s less each way.
SHORT_DATA_MIB = 4

Json = dict[str, Any]


class StepFailed(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"e2e: {message}", flush=True)


def run(*argv: str, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and result.returncode != 0:
        output = (result.stdout.strip() + "\n" + result.stderr.strip()).strip()
        raise StepFailed(f"{' '.join(argv[:4])} ... failed: {output[-2000:]}")
    return result.stdout


def kubectl(*argv: str, input: str | None = None, check: bool = True) -> str:
    return run(os.environ.get("KUBECTL", "kubectl"), *argv, input=input, check=check)


def kube_json(*argv: str) -> Json:
    return json.loads(kubectl(*argv, "-o", "json"))


def apply(manifest: Json) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(manifest))


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 2) -> None:
    try:
        plugin.wait_until(check, timeout_s, what, every_s)
    except TimeoutError as exc:
        raise StepFailed(str(exc)) from None


@dataclass
class Table:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Times the block; what it appends to the yielded list becomes the row's note."""
        notes: list[str] = []
        log(f"step: {name}")
        began = time.monotonic()
        try:
            yield notes
        except Exception as exc:
            self.rows.append((name, time.monotonic() - began, f"FAILED: {exc}"))
            raise
        self.rows.append((name, time.monotonic() - began, "; ".join(notes)))
        log(f"done: {name} in {self.rows[-1][1]:.1f} s")

    def markdown(self) -> str:
        lines = ["| step | seconds | notes |", "|---|---|---|"]
        lines += [f"| {name} | {seconds:.1f} | {note} |" for name, seconds, note in self.rows]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- the node


NODE_NAMESPACE = "e2e-node"
NODE_POD = "node-debug"
# What node_python runs in the node pod: the node's view through /proc of PID 1 (the
# pod shares the node's PID namespace) and /host (the node's root).
NODE_VIEW = r"""
import glob, json, os
mounts = [line.split()[4] for line in open("/proc/1/mountinfo")]
devices = sorted(path.split("/")[-2] for path in glob.glob("/sys/block/nbd*/pid"))
servers = []
for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        argv = open(cmdline, "rb").read().split(b"\0")
    except OSError:
        continue
    if os.path.basename(argv[0]) in (b"zerofs", b"nbdkit", b"diod"):
        servers.append(cmdline.split("/")[2])
print(json.dumps({"mounts": mounts, "devices": devices, "servers": servers}))
"""


def start_node_pod(images: Images) -> None:
    kubectl("create", "namespace", NODE_NAMESPACE)
    kubectl("label", "namespace", NODE_NAMESPACE, "pod-security.kubernetes.io/enforce=privileged")
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": NODE_POD, "namespace": NODE_NAMESPACE},
            "spec": {
                "hostPID": True,
                "nodeName": os.environ["NODE_NAME"],
                "tolerations": [{"operator": "Exists"}],
                "containers": [
                    {
                        "name": "node",
                        "image": images.workload,
                        "command": ["sleep", "infinity"],
                        "securityContext": {"privileged": True},
                        "volumeMounts": [
                            {
                                "name": "root",
                                "mountPath": "/host",
                                "mountPropagation": "HostToContainer",
                            }
                        ],
                    }
                ],
                "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            },
        }
    )
    kubectl(
        "-n", NODE_NAMESPACE, "wait", "--for=condition=Ready", f"pod/{NODE_POD}",
        "--timeout=900s",
    )  # fmt: skip


def node_exec(*argv: str) -> str:
    """ARGV run on the node (its root, its PID namespace)."""
    return kubectl("-n", NODE_NAMESPACE, "exec", NODE_POD, "--", "chroot", "/host", *argv)


def node_view() -> Json:
    output = kubectl("-n", NODE_NAMESPACE, "exec", NODE_POD, "--", "python3", "-c", NODE_VIEW)
    return dict(json.loads(output))


def stamped_lines(kernel_log: str) -> list[tuple[float, str]]:
    """dmesg's lines as (seconds since boot, line)."""
    lines = []
    for line in kernel_log.splitlines():
        stamp = KERNEL_STAMP.match(line)
        if stamp:
            lines.append((float(stamp[1]), line))
    return lines


def kernel_log_mark(kernel_log: str) -> float:
    """The time of the kernel log's last line: a mark by time, not by line count, which
    stops counting once the log's buffer is full and drops its oldest lines."""
    lines = stamped_lines(kernel_log)
    return lines[-1][0] if lines else 0.0


def kernel_errors_since(kernel_log: str, mark: float) -> list[str]:
    lines = stamped_lines(kernel_log)
    if lines and lines[0][0] > mark:
        raise StepFailed(
            f"the node's kernel log lost lines since {mark} s (it now starts at "
            f"{lines[0][0]} s): its errors cannot be checked"
        )
    return [line for stamp, line in lines if stamp > mark and KERNEL_ERRORS.search(line)]


def ctr(*argv: str) -> str:
    binary = Path(os.environ["KUBECTL"]).parent / "ctr"
    return node_exec(
        str(binary), "--address", "/run/containerd/containerd.sock", "-n", "k8s.io", *argv
    )


def container_pid(pod: Json) -> int:
    """The node's PID of the pod's first container (from containerd)."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    for line in ctr("task", "ls").splitlines()[1:]:
        words = line.split()
        if words and words[0] == container_id:
            return int(words[1])
    raise StepFailed(f"containerd has no running task {container_id[:12]}")


# ------------------------------------------------------------------- the chart


@dataclass(frozen=True)
class Images:
    plugin_repository: str
    plugin_tag: str
    server: str
    workload: str
    busybox_repository: str
    busybox_tag: str


def images_from(lines: Sequence[str]) -> Images:
    by_repository: dict[str, str] = {}
    for line in lines:
        archive, repository = line.split()
        by_repository[repository] = archive_tag(archive, repository)
    plugin = next(repo for repo in by_repository if repo.endswith("/zerofs-csi"))
    # A real ZeroFS when the images hold one (ZEROFS_BIN), else the stand-in.
    server = next(
        (repo for repo in by_repository if repo.endswith("/zerofs")),
        next(repo for repo in by_repository if repo.endswith("/zerofs-standin")),
    )
    workload = next(repo for repo in by_repository if repo.endswith("/python"))
    busybox = next(repo for repo in by_repository if repo.endswith("/busybox"))
    return Images(
        plugin,
        by_repository[plugin],
        f"{server}:{by_repository[server]}",
        f"{workload}:{by_repository[workload]}",
        busybox,
        by_repository[busybox],
    )


def storage_class_values(index: int, name: str, filesystem: str, images: Images) -> list[str]:
    """A StorageClass's chart values. With syncWrites: its servers are killed under a
    writer, which must see no I/O error (without it the node fails such a device)."""
    prefix = f"storageClasses[{index}]"
    values = {
        "name": name,
        "storageUrl": f"s3://{BUCKET}/volumes",
        "filesystem": filesystem,
        "s3Endpoint": os.environ["S3_ENDPOINT"],
        "s3Region": "us-east-1",
        "s3AllowHttp": "true",
        "deleteDataOnPVCDelete": "true",
        "parameters.image": images.server,
        "parameters.syncWrites": "true",
    }
    # The class's free-form parameters are strings ("true" would be a boolean to --set).
    return [
        arg
        for key, value in values.items()
        for arg in (
            "--set-string" if key.startswith("parameters.") else "--set",
            f"{prefix}.{key}={value}",
        )
    ]


def install_chart(images: Images, table: Table) -> None:
    with table.step("namespace, Secret, helm install (as the README)") as notes:
        notes.append(f"volume servers: {images.server}")
        kubectl("create", "namespace", NAMESPACE)
        kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=privileged")
        kubectl(
            "-n", NAMESPACE, "create", "secret", "generic", SECRET,
            f"--from-literal=AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}",
            f"--from-literal=ZEROFS_ENCRYPTION_PASSWORD={secrets.token_urlsafe(32)}",
        )  # fmt: skip
        run(
            str(HELM), "install", RELEASE, str(REPO / "charts" / "zerofs-csi"), "-n", NAMESPACE,
            "--set", f"image.repository={images.plugin_repository}",
            "--set", f"image.tag={images.plugin_tag}",
            "--set", f"secret.existingSecret={SECRET}",
            *storage_class_values(0, "zerofs", "ext4", images),
            *storage_class_values(1, "zerofs-xfs", "xfs", images),
        )  # fmt: skip
    with table.step("plugin pods ready (node DaemonSet, controller Deployment)") as notes:
        kubectl("-n", NAMESPACE, "rollout", "status", "daemonset/zerofs-csi-node", "--timeout=900s")
        kubectl(
            "-n", NAMESPACE, "rollout", "status", "deployment/zerofs-csi-controller",
            "--timeout=900s",
        )  # fmt: skip
        node = kube_json("get", "csinode", os.environ["NODE_NAME"])
        drivers = [driver["name"] for driver in node["spec"].get("drivers") or []]
        if DRIVER not in drivers:
            raise StepFailed(f"kubelet did not register {DRIVER} (CSINode drivers: {drivers})")
        notes.append("CSINode lists the driver")


def create_bucket() -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["S3_HOST_ENDPOINT"], region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    # An object outside every volume's prefix: deleting volumes must leave it.
    s3.put_object(Bucket=BUCKET, Key="outside/keep-me", Body=b"not a volume's")


def s3_keys(prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["S3_HOST_ENDPOINT"], region_name="us-east-1")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


# ----------------------------------------------------------------- workloads


def pvc(
    name: str, storage_class: str, size: str, block: bool = False, mode: str = "ReadWriteOnce"
) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": WORKLOAD_NAMESPACE},
        "spec": {
            "accessModes": [mode],
            "storageClassName": storage_class,
            "volumeMode": "Block" if block else "Filesystem",
            "resources": {"requests": {"storage": size}},
        },
    }


def workload_pod(name: str, claim: str, image: str, args: Sequence[str], block: bool) -> Json:
    container: Json = {
        "name": "workload",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "/workload/workload.py", *args],
        "volumeMounts": [{"name": "workload", "mountPath": "/workload"}],
    }
    if block:
        container["volumeDevices"] = [{"name": "data", "devicePath": "/dev/data"}]
    else:
        container["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": WORKLOAD_NAMESPACE},
        "spec": {
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                {"name": "workload", "configMap": {"name": "workload"}},
            ],
        },
    }


def pod_phase(name: str) -> str:
    return kubectl(
        "-n", WORKLOAD_NAMESPACE, "get", "pod", name, "-o", "jsonpath={.status.phase}",
        check=False,
    )  # fmt: skip


# xfs's first stage zeroes a 64 MiB log through the stand-in: 12 min seen under TCG.
def run_pod_to_completion(pod: Json, timeout_s: float = 1800) -> str:
    """Starts the pod, waits for it to end; its log when it succeeded."""
    name = pod["metadata"]["name"]
    apply(pod)
    wait_until(f"pod {name} ends", lambda: pod_phase(name) in ("Succeeded", "Failed"), timeout_s)
    output = kubectl("-n", WORKLOAD_NAMESPACE, "logs", name, check=False)
    if pod_phase(name) != "Succeeded":
        raise StepFailed(f"pod {name} failed: {output.strip()[-500:]}")
    kubectl("-n", WORKLOAD_NAMESPACE, "delete", "pod", name, "--wait=true", "--timeout=600s")
    return output


def volume_of(claim: str) -> str:
    volume = kube_json("-n", WORKLOAD_NAMESPACE, "get", "pvc", claim)["spec"]["volumeName"]
    return str(kube_json("get", "pv", volume)["spec"]["csi"]["volumeHandle"])


def bound(claim: str) -> bool:
    phase = kubectl(
        "-n", WORKLOAD_NAMESPACE, "get", "pvc", claim, "-o", "jsonpath={.status.phase}",
        check=False,
    )  # fmt: skip
    return phase == "Bound"


def write(
    table: Table, images: Images, claim: str, sc: str, block: bool, mib: int = DATA_MIB
) -> list[str]:
    """A new PVC written by a pod that then ends; the workload arguments that verify it."""
    target = "/dev/data" if block else "/data/file"
    seed = str(secrets.randbelow(1 << 30))
    with table.step(f"{claim}: PVC bound") as notes:
        apply(pvc(claim, sc, CLAIM_SIZE, block))
        wait_until(f"PVC {claim} bound", lambda: bound(claim), 300)
        notes.append(f"volume {volume_of(claim)}")
    with table.step(f"{claim}: pod writes {mib} MiB, ends, pod deleted"):
        args = ["write", target, seed, str(mib)]
        run_pod_to_completion(workload_pod(f"{claim}-writer", claim, images.workload, args, block))
    return ["verify", target, seed, str(mib)]


def write_then_verify(table: Table, images: Images, claim: str, sc: str, block: bool) -> list[str]:
    """``write``, then a new pod verifies; the workload arguments that verify it."""
    verify = write(table, images, claim, sc, block)
    with table.step(f"{claim}: a new pod verifies every byte"):
        run_pod_to_completion(
            workload_pod(f"{claim}-reader", claim, images.workload, verify, block)
        )
    return verify


def expand(table: Table, images: Images, claim: str) -> None:
    """Offline expansion: the resizer grows the volume, the next stage grows the filesystem."""
    with table.step(f"{claim}: PVC {CLAIM_SIZE} -> {GROWN_SIZE} through the resizer") as notes:
        kubectl(
            "-n", WORKLOAD_NAMESPACE, "patch", "pvc", claim, "--type=merge",
            "-p", json.dumps({"spec": {"resources": {"requests": {"storage": GROWN_SIZE}}}}),
        )  # fmt: skip

        def resized() -> bool:
            volume = kube_json("-n", WORKLOAD_NAMESPACE, "get", "pvc", claim)["spec"]["volumeName"]
            capacity = kube_json("get", "pv", volume)["spec"]["capacity"]["storage"]
            return bool(capacity == GROWN_SIZE)

        wait_until(f"PV of {claim} at {GROWN_SIZE}", resized, 600)
        notes.append(f"PV capacity {GROWN_SIZE}")
    with table.step(f"{claim}: next pod sees a {GROWN_SIZE} filesystem, data verified"):
        grown = ["capacity", "/data", "0", str(GROWN_MIN_MIB)]
        run_pod_to_completion(workload_pod(f"{claim}-grown", claim, images.workload, grown, False))
        kubectl("-n", WORKLOAD_NAMESPACE, "get", "pvc", claim)


def plugin_pods() -> list[Json]:
    return list(
        kube_json(
            "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=node"
        )["items"]
    )  # fmt: skip


def kill_the_server(table: Table, images: Images, volume: str) -> None:
    server_pod = f"zerofs-volume-{volume}"
    with table.step("kill -9 of the volume's server process under the writer") as notes:
        pod = kube_json("-n", NAMESPACE, "get", "pod", server_pod)
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        node_exec("kill", "-9", str(container_pid(pod)))

        def restarted() -> bool:
            status = kube_json("-n", NAMESPACE, "get", "pod", server_pod)["status"]
            container = status["containerStatuses"][0]
            return bool(container["restartCount"] > restarts and container.get("ready"))

        wait_until(f"{server_pod} restarted and ready", restarted, 600, every_s=1)
        notes.append("server container restarted and ready")


def delete_the_plugin_pod(table: Table, images: Images, volume: str) -> None:
    with table.step("delete of the node plugin pod under the writer") as notes:
        old = {pod["metadata"]["name"] for pod in plugin_pods()}
        kubectl("-n", NAMESPACE, "delete", "pod", "-l", "app.kubernetes.io/component=node")
        kubectl("-n", NAMESPACE, "rollout", "status", "daemonset/zerofs-csi-node", "--timeout=900s")
        new = {pod["metadata"]["name"] for pod in plugin_pods()}
        if new & old:
            raise StepFailed(f"plugin pod {sorted(new & old)} was not replaced")
        notes.append("the DaemonSet recreated it")


def roll_the_plugin_out(table: Table, images: Images, volume: str) -> None:
    with table.step("DaemonSet rollout to a new image tag under the writer") as notes:
        new_tag = f"{images.plugin_tag}-rollout"
        ctr(
            "images", "tag", "--force", f"{images.plugin_repository}:{images.plugin_tag}",
            f"{images.plugin_repository}:{new_tag}",
        )  # fmt: skip
        run(
            str(HELM), "upgrade", RELEASE, str(REPO / "charts" / "zerofs-csi"), "-n", NAMESPACE,
            "--reuse-values", "--set", f"image.tag={new_tag}",
        )  # fmt: skip
        kubectl("-n", NAMESPACE, "rollout", "status", "daemonset/zerofs-csi-node", "--timeout=900s")
        images_now = {
            container["image"]
            for pod in plugin_pods()
            for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]
            if container["name"] == "zerofs-csi"
        }
        if images_now != {f"{images.plugin_repository}:{new_tag}"}:
            raise StepFailed(f"plugin pods run {sorted(images_now)} after the rollout")
        notes.append(f"plugin pods on :{new_tag}")


# The chart's VolumeSnapshotClass (values snapshots.volumeSnapshotClass.name).
SNAPSHOT_CLASS = "zerofs"


def snapshot_under_the_writer(
    table: Table, images: Images, volume: str, verify: Sequence[str] = ()
) -> None:
    """A VolumeSnapshot of the writer's claim: the snapshot controller, the chart's
    csi-snapshotter and the node plugin's checkpoint of the staged volume make it ready.
    With VERIFY (workload arguments checking data the claim held before the snapshot),
    a new claim is restored from it (the controller's restore pod) and a pod verifies
    that data there. Deleted, the snapshot's content goes too (deletionPolicy Delete:
    DeleteSnapshot)."""
    source = kube_json("get", "pv", volume)["spec"]["claimRef"]["name"]
    name = f"{source}-snapshot"
    with table.step("VolumeSnapshot of the claim under the writer, ready") as notes:
        apply(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": name, "namespace": WORKLOAD_NAMESPACE},
                "spec": {
                    "volumeSnapshotClassName": SNAPSHOT_CLASS,
                    "source": {"persistentVolumeClaimName": source},
                },
            }
        )

        def status() -> Json:
            snapshot = kube_json("-n", WORKLOAD_NAMESPACE, "get", "volumesnapshot", name)
            return dict(snapshot.get("status") or {})

        wait_until(
            f"VolumeSnapshot {name} ready to use", lambda: status().get("readyToUse") is True, 600
        )
        content_name = status()["boundVolumeSnapshotContentName"]
        content = kube_json("get", "volumesnapshotcontent", content_name)["status"]
        notes.append(f"{content['snapshotHandle']}, restore size {content['restoreSize']}")
    if verify:
        restore_the_snapshot(table, images, source, name, int(content["restoreSize"]), verify)
    with table.step("VolumeSnapshot deleted, its content gone"):
        kubectl("-n", WORKLOAD_NAMESPACE, "delete", "volumesnapshot", name, "--timeout=600s")
        wait_until(
            f"VolumeSnapshotContent {content_name} deleted",
            lambda: (
                not kubectl(
                    "get", "volumesnapshotcontent", "--ignore-not-found", "-o", "name", content_name
                ).strip()
            ),
            600,
        )


def restore_the_snapshot(
    table: Table, images: Images, source: str, snapshot: str, size: int, verify: Sequence[str]
) -> None:
    """A ReadOnlyMany claim of the source's class from the snapshot (a restore pod fills
    it; each node serves it read-only), verified by a pod, deleted."""
    claim = f"{source}-restored"
    storage_class = kube_json("-n", WORKLOAD_NAMESPACE, "get", "pvc", source)["spec"][
        "storageClassName"
    ]
    with table.step(f"{claim}: ReadOnlyMany PVC from the snapshot bound (restore pod)") as notes:
        manifest = pvc(claim, storage_class, str(size), mode="ReadOnlyMany")
        manifest["spec"]["dataSource"] = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": snapshot,
        }
        apply(manifest)
        wait_until(f"PVC {claim} bound", lambda: bound(claim), 1800, every_s=5)
        notes.append(f"volume {volume_of(claim)}")
    with table.step(f"{claim}: a pod verifies the data as of the snapshot, read-only"):
        run_pod_to_completion(
            workload_pod(f"{claim}-reader", claim, images.workload, verify, block=False)
        )
    with table.step(f"{claim}: PVC deleted"):
        volume = volume_of(claim)
        kubectl("-n", WORKLOAD_NAMESPACE, "delete", "pvc", claim, "--wait=true")
        wait_until(
            f"PV of {claim} deleted",
            lambda: (
                not any(
                    pv["spec"]["csi"]["volumeHandle"] == volume
                    for pv in kube_json("get", "pv")["items"]
                )
            ),
            600,
        )


Fault = Callable[[Table, Images, str], None]


def faults_under_a_writer(
    table: Table,
    images: Images,
    claim: str,
    faults: Sequence[Fault],
    verify_first: Sequence[str] = (),
    mib: int = DATA_MIB,
) -> None:
    """A writer pod rewrites its file while each fault strikes in turn; it must see no
    error and verify its data at the end. VERIFY_FIRST: workload arguments the pod runs
    before it starts writing (a new pod's check of an earlier pod's data)."""
    writer = f"{claim}-churn"
    seed = str(secrets.randbelow(1 << 30))
    churn = ["churn", "/data/churn", seed, str(mib), "/data/stop"]
    args = [*verify_first, "--", *churn] if verify_first else churn
    apply(workload_pod(writer, claim, images.workload, args, False))
    step = f"{claim}: writer pod rewriting" + (", earlier data verified" if verify_first else "")

    def writing() -> bool:
        phase = pod_phase(writer)
        output = kubectl("-n", WORKLOAD_NAMESPACE, "logs", writer, check=False)
        if phase in ("Failed", "Succeeded"):
            raise StepFailed(f"pod {writer} ended ({phase}) before the faults: {output[-500:]}")
        return phase == "Running" and "churn: rewriting" in output

    with table.step(step):
        wait_until(f"pod {writer} writing", writing, 900)
    volume = volume_of(claim)
    for fault in faults:
        time.sleep(15)
        fault(table, images, volume)
        check_still_writing(writer, f"after the step '{table.rows[-1][0]}'")
    time.sleep(15)
    with table.step("writer stops and verifies its data") as notes:
        check_still_writing(writer, "before it was told to stop")
        kubectl("-n", WORKLOAD_NAMESPACE, "exec", writer, "--", "touch", "/data/stop")
        wait_until(f"pod {writer} ends", lambda: pod_phase(writer) in ("Succeeded", "Failed"), 900)
        output = kubectl("-n", WORKLOAD_NAMESPACE, "logs", writer, check=False).strip()
        if pod_phase(writer) != "Succeeded":
            raise StepFailed(f"the writer failed: {output[-500:]}")
        notes.append(output.splitlines()[-2] if len(output.splitlines()) > 1 else output)
        kubectl("-n", WORKLOAD_NAMESPACE, "delete", "pod", writer, "--wait=true", "--timeout=600s")


def check_still_writing(writer: str, when: str) -> None:
    """StepFailed with the writer's last words and its container's end when it ended."""
    phase = pod_phase(writer)
    if phase not in ("Succeeded", "Failed"):
        return
    output = kubectl("-n", WORKLOAD_NAMESPACE, "logs", writer, check=False).strip()
    statuses = kube_json("-n", WORKLOAD_NAMESPACE, "get", "pod", writer)["status"]
    ended = [
        status.get("state", {}).get("terminated", {}) for status in statuses["containerStatuses"]
    ]
    how = "; ".join(
        f"exit {end.get('exitCode')} ({end.get('reason')}) at {end.get('finishedAt')}"
        for end in ended
        if end
    )
    raise StepFailed(f"the writer pod ended ({phase}, {how}) {when}: {output[-800:]}")


def delete_claims(table: Table, claims: Sequence[str]) -> None:
    """deleteDataOnPVCDelete: each volume's objects go, every other object stays."""
    volumes = {claim: volume_of(claim) for claim in claims}
    for claim, volume in volumes.items():
        with table.step(f"{claim}: PVC deleted, its objects gone from S3") as notes:
            before = len(s3_keys(f"volumes/{volume}/"))
            if before == 0:
                raise StepFailed(f"volume {volume} has no objects in S3 before its deletion")
            others = {key for key in s3_keys("") if not key.startswith(f"volumes/{volume}/")}
            kubectl("-n", WORKLOAD_NAMESPACE, "delete", "pvc", claim, "--wait=true")
            wait_until(
                f"PV of {claim} deleted",
                lambda volume=volume: (
                    not any(
                        pv["spec"]["csi"]["volumeHandle"] == volume
                        for pv in kube_json("get", "pv")["items"]
                    )
                ),
                600,
            )
            left = s3_keys(f"volumes/{volume}/")
            if left:
                raise StepFailed(f"{len(left)} objects of volume {volume} left in S3: {left[:3]}")
            missing = others - set(s3_keys(""))
            if missing:
                raise StepFailed(f"objects of others deleted with {volume}: {sorted(missing)[:3]}")
            notes.append(f"{before} objects deleted, {len(others)} others kept")


def validation_chart(table: Table, images: Images) -> None:
    with table.step("helm test of the validation chart") as notes:
        run(
            str(HELM), "install", "zerofs-validation",
            str(REPO / "charts" / "zerofs-csi-validation"), "-n", WORKLOAD_NAMESPACE,
            "--set", "storageClassName=zerofs",
            "--set", f"image.repository={images.busybox_repository}",
            "--set", f"image.tag={images.busybox_tag}",
        )  # fmt: skip
        output = run(
            str(HELM), "test", "zerofs-validation", "-n", WORKLOAD_NAMESPACE, "--logs",
            "--timeout", "30m",
        )  # fmt: skip
        notes.append(f"{output.count('Succeeded')} test phases succeeded")
        run(str(HELM), "uninstall", "zerofs-validation", "-n", WORKLOAD_NAMESPACE)


def save_pod_logs(folder: Path) -> None:
    """Every container's log of the driver's namespace (plugin and server pods), the
    previous run's too where a container restarted, each line stamped by kubelet: what
    a failed or slow step is read from once the uninstall has removed the pods."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.log"):
        old.unlink()
    for pod in kube_json("-n", NAMESPACE, "get", "pods")["items"]:
        name = pod["metadata"]["name"]
        statuses = pod.get("status", {})
        for status in statuses.get("initContainerStatuses", []) + statuses.get(
            "containerStatuses", []
        ):
            container = status["name"]
            lives: dict[str, list[str]] = {"": []}
            if status.get("restartCount"):
                lives[".previous"] = ["--previous"]
            for suffix, which in lives.items():
                output = kubectl(
                    "-n", NAMESPACE, "logs", name, "-c", container, "--timestamps", *which,
                    check=False,
                )  # fmt: skip
                (folder / f"{name}.{container}{suffix}.log").write_text(output)


def uninstall(table: Table) -> None:
    with table.step("helm uninstall leaves no pod, device, mount or server") as notes:
        kubectl("delete", "namespace", WORKLOAD_NAMESPACE, "--wait=true", "--timeout=900s")
        wait_until(
            "every PV gone",
            lambda: not kube_json("get", "pv")["items"],
            900,
        )
        # Helm 3.6 (tools/helm.sh) has no uninstall --wait: the pods are awaited below.
        run(str(HELM), "uninstall", RELEASE, "-n", NAMESPACE, "--timeout", "15m")
        wait_until(
            f"no pod in {NAMESPACE}",
            lambda: not kube_json("-n", NAMESPACE, "get", "pods")["items"],
            600,
        )
        view = node_view()
        left = {
            "NBD devices": view["devices"],
            "CSI mounts": [m for m in view["mounts"] if re.search(r"kubernetes\.io[~/]csi", m)],
            "server processes": view["servers"],
        }
        found = {what: items for what, items in left.items() if items}
        if found:
            raise StepFailed(f"left on the node: {found}")
        notes.append("nothing left")
    kubectl("delete", "namespace", NODE_NAMESPACE, "--wait=false")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/cluster/e2e.py")
    parser.add_argument(
        "--images",
        type=Path,
        default=os.environ.get("IMAGES_FILE"),
        help="'<archive> <repository>' lines of the node's images (default: $IMAGES_FILE)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "build" / "e2e.md")
    parser.add_argument(
        "--short",
        action="store_true",
        help="make test's part: install, an ext4 volume written and verified across pods, "
        "kill -9 of its server under a writer, its deletion from S3, the uninstall",
    )
    parser.add_argument(
        "--volumes",
        default="ext4,xfs,raw",
        help="the full path's volumes, comma-separated from ext4, xfs and raw (ext4 always: "
        "it is the one expanded); the faults strike the xfs volume's writer when there is "
        "one, else ext4's. Under TCG xfs's first stage alone takes 10 to 30 minutes",
    )
    args = parser.parse_args(argv)
    volumes = ["ext4", *(v for v in args.volumes.split(",") if v in ("xfs", "raw"))]
    if set(args.volumes.split(",")) - {"ext4", "xfs", "raw"}:
        parser.error("--volumes takes ext4, xfs and raw")
    images = images_from(args.images.read_text().splitlines())
    table = Table()
    logs = args.output.with_suffix(".logs")
    try:
        start_node_pod(images)
        mark = kernel_log_mark(node_exec("dmesg"))
        create_bucket()
        install_chart(images, table)
        kubectl("create", "namespace", WORKLOAD_NAMESPACE)
        kubectl(
            "-n", WORKLOAD_NAMESPACE, "create", "configmap", "workload",
            f"--from-file=workload.py={HERE / 'workload.py'}",
        )  # fmt: skip
        if args.short:
            verify = write(table, images, "ext4", "zerofs", block=False, mib=SHORT_DATA_MIB)
            faults_under_a_writer(
                table, images, "ext4", [kill_the_server], verify_first=verify, mib=SHORT_DATA_MIB
            )
            delete_claims(table, ["ext4"])
        else:
            written = {"ext4": write_then_verify(table, images, "ext4", "zerofs", block=False)}
            if "xfs" in volumes:
                written["xfs"] = write_then_verify(table, images, "xfs", "zerofs-xfs", block=False)
            if "raw" in volumes:
                write_then_verify(table, images, "raw", "zerofs", block=True)
            expand(table, images, "ext4")
            churned = "xfs" if "xfs" in volumes else "ext4"
            # The snapshot is restored into a new claim, where the data the claim held
            # before it (written and verified above) is verified again.
            snapshot = functools.partial(snapshot_under_the_writer, verify=written[churned])
            faults = [snapshot, kill_the_server, delete_the_plugin_pod, roll_the_plugin_out]
            faults_under_a_writer(table, images, churned, faults)
            delete_claims(table, volumes)
            validation_chart(table, images)
        save_pod_logs(logs)
        uninstall(table)
        errors = kernel_errors_since(node_exec("dmesg"), mark)
        if errors:
            raise StepFailed("the kernel logged errors: " + " | ".join(errors[:5]))
    except StepFailed as exc:
        log(f"FAILED: {exc}")
        save_pod_logs(logs)
        log(f"the driver's pod logs: {logs}")
        return 1
    finally:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table.markdown())
        print(table.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
