"""Restores on the Kubernetes backend (controller.restores_kube): the restore pod and its
Secret as the API server takes them, and the state machine across CreateVolume's
retries, the pod's status set as kubelet would set it. Against the fake and (with
envtest) a real API server, which validates the manifests (native sidecars included)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kubernetes import client

from kube.cluster import Cluster
from kube.conftest import SECRETS, new_volume_id
from zerofs_csi import errors
from zerofs_csi.controller.checkpoints import CheckpointSource, JobInProgress
from zerofs_csi.controller.checkpoints_kube import KubeCheckpoints
from zerofs_csi.controller.job_pods_kube import KubeJobs
from zerofs_csi.controller.restores_kube import KubeRestores
from zerofs_csi.controller.store_kube import KubernetesVolumeStore
from zerofs_csi.kube.api import call_json, is_status
from zerofs_csi.servers.pods import job_pods

COPY_IMAGE = "zerofs-csi:restore-test"
CSI_SECRETS = {
    "ZEROFS_ENCRYPTION_PASSWORD": SECRETS.encryption_password,
    "AWS_ACCESS_KEY_ID": SECRETS.access_key_id,
    "AWS_SECRET_ACCESS_KEY": SECRETS.secret_access_key,
}
PARAMETERS = {"storageUrl": "s3://zerofs-test/volumes", "s3Endpoint": "https://s3.example.test"}
SOURCE = CheckpointSource("pvc-source", PARAMETERS, "snap-1")
GiB = 1 << 30


def _restores(cluster: Cluster, admin: client.ApiClient) -> KubeRestores:
    return KubeRestores(KubeJobs(admin, cluster.namespace, COPY_IMAGE, wait_seconds=0.5))


def _fill(restores: KubeRestores, volume_id: str, capacity: int = GiB) -> None:
    restores.fill(SOURCE, volume_id, PARAMETERS, capacity, CSI_SECRETS)


def _read(admin: client.ApiClient, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    core = client.CoreV1Api(admin)
    read = core.read_namespaced_pod if kind == "pod" else core.read_namespaced_secret
    try:
        return call_json(read, name, namespace)
    except client.ApiException as exc:
        if is_status(exc, 404):
            return None
        raise


def _set_status(admin: client.ApiClient, namespace: str, name: str, status: dict[str, Any]) -> None:
    """What kubelet would write of the pod's state."""
    core = client.CoreV1Api(admin)
    pod = call_json(core.read_namespaced_pod, name, namespace)
    pod["status"] = status
    call_json(core.replace_namespaced_pod_status, name, namespace, pod)


def _copy_ended(exit_code: int, message: str = "") -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed"}
    if message:
        terminated["message"] = message
    return {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [
            {
                "name": job_pods.JOB_CONTAINER,
                "image": COPY_IMAGE,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }


def test_the_restore_pod_and_secret_hold_no_secret_in_the_pod(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    restores = _restores(cluster, admin)
    vid = new_volume_id()
    with pytest.raises(JobInProgress, match="retry"):
        _fill(restores, vid)
    name = job_pods.restore_pod_name(vid)
    pod = _read(admin, "pod", name, cluster.namespace)
    secret = _read(admin, "secret", name, cluster.namespace)
    assert pod is not None and secret is not None
    text = json.dumps(pod)
    for value in CSI_SECRETS.values():
        assert value not in text
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["initContainers"]] == ["source", "target"]
    assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    source, target = spec["initContainers"]
    assert source["args"][-2:] == ["--checkpoint", "snap-1"]
    assert "--checkpoint" not in target["args"]
    (copy,) = spec["containers"]
    assert copy["image"] == COPY_IMAGE
    assert copy["args"][copy["args"].index("--capacity-bytes") + 1] == str(GiB)
    # Every root filesystem is read-only: /tmp is a volume of the pod's (nbdcopy's stderr
    # goes there), and a copy that dies without its outcome still reports its log's tail.
    for container in [*spec["initContainers"], copy]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, container["name"]
    assert copy["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # The secret values are in the Secret, under each server's keys, and the pod owns it.
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert SECRETS.secret_access_key in {values[k] for k in values if k.startswith("source.")}
    assert SECRETS.secret_access_key in {values[k] for k in values if k.startswith("target.")}
    assert "pvc-source" in values["source.toml"] and vid in values["target.toml"]
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Pod", pod["metadata"]["uid"])


def test_a_restore_goes_on_across_retries_until_the_pod_succeeds(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    restores = _restores(cluster, admin)
    vid = new_volume_id()
    name = job_pods.restore_pod_name(vid)
    with pytest.raises(JobInProgress):
        _fill(restores, vid)
    first = _read(admin, "pod", name, cluster.namespace)
    assert first is not None
    _set_status(admin, cluster.namespace, name, {"phase": "Running"})
    with pytest.raises(JobInProgress, match="Running"):
        _fill(restores, vid)
    # The retry followed the same pod; it did not start another.
    again = _read(admin, "pod", name, cluster.namespace)
    assert again is not None and again["metadata"]["uid"] == first["metadata"]["uid"]
    _set_status(admin, cluster.namespace, name, _copy_ended(0))
    _fill(restores, vid)
    assert _read(admin, "pod", name, cluster.namespace) is None
    assert _read(admin, "secret", name, cluster.namespace) is None


@pytest.mark.parametrize(
    ("message", "expected", "needle"),
    [
        ("OUT_OF_RANGE: the source holds 2 bytes, more than 1", errors.OutOfRange, "source holds"),
        ("UNAVAILABLE: the new volume's server did not answer", errors.Unavailable, "answer"),
        ("", errors.Internal, "job exited 137"),
        # No outcome written: kubelet gave the log's tail (FallbackToLogsOnError).
        (
            'Traceback (most recent call last):\n  File "copy.py", line 9, in main\n'
            "PermissionError: [Errno 13] Permission denied: '/run/zerofs-job'\n",
            errors.Internal,
            r"exited 1\): .*line 9, in main / PermissionError: \[Errno 13\]",
        ),
    ],
)
def test_a_failed_copy_answers_with_its_code_and_leaves_nothing(
    cluster: Cluster,
    admin: client.ApiClient,
    message: str,
    expected: type[errors.CsiError],
    needle: str,
) -> None:
    restores = _restores(cluster, admin)
    vid = new_volume_id()
    name = job_pods.restore_pod_name(vid)
    with pytest.raises(JobInProgress):
        _fill(restores, vid)
    _set_status(admin, cluster.namespace, name, _copy_ended(1 if message else 137, message))
    with pytest.raises(expected, match=needle) as failed:
        _fill(restores, vid)
    assert not isinstance(failed.value, JobInProgress)
    assert _read(admin, "pod", name, cluster.namespace) is None
    assert _read(admin, "secret", name, cluster.namespace) is None
    # The next retry starts over.
    with pytest.raises(JobInProgress):
        _fill(restores, vid)
    assert _read(admin, "pod", name, cluster.namespace) is not None


def test_a_pod_of_another_restore_is_replaced(cluster: Cluster, admin: client.ApiClient) -> None:
    restores = _restores(cluster, admin)
    vid = new_volume_id()
    name = job_pods.restore_pod_name(vid)
    with pytest.raises(JobInProgress):
        _fill(restores, vid, capacity=GiB)
    first = _read(admin, "pod", name, cluster.namespace)
    assert first is not None
    with pytest.raises(JobInProgress, match="another job"):
        _fill(restores, vid, capacity=2 * GiB)
    with pytest.raises(JobInProgress):
        _fill(restores, vid, capacity=2 * GiB)
    second = _read(admin, "pod", name, cluster.namespace)
    assert second is not None and second["metadata"]["uid"] != first["metadata"]["uid"]
    copy = second["spec"]["containers"][0]
    assert copy["args"][copy["args"].index("--capacity-bytes") + 1] == str(2 * GiB)


def test_delete_volume_removes_a_restore_left_behind_and_is_idempotent(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    jobs = KubeJobs(admin, cluster.namespace, COPY_IMAGE, wait_seconds=0.5)
    vid = new_volume_id()
    with pytest.raises(JobInProgress):
        _fill(KubeRestores(jobs), vid)
    # What DeleteVolume calls (runtime.build_controller's remove_volume_pods).
    checkpoints = KubeCheckpoints(
        admin, cluster.namespace, KubernetesVolumeStore(admin, cluster.namespace), jobs=jobs
    )
    checkpoints.remove_jobs(vid)
    checkpoints.remove_jobs(vid)
    name = job_pods.restore_pod_name(vid)
    assert _read(admin, "secret", name, cluster.namespace) is None
    pod = _read(admin, "pod", name, cluster.namespace)
    # A real API server keeps a pod on a node until its kubelet confirms; this one is on none.
    assert pod is None
