"""The Kubernetes backend's lifecycle, against the fake and (with envtest) a real API server."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from kube.cluster import DAEMONSET, DAEMONSET_LABELS, NODE, OTHER_NODE, Cluster
from kube.conftest import SECRETS, new_volume_id, volume_settings
from kube.kubelet import KubeletStandIn, PendingStatus
from zerofs_csi import errors
from zerofs_csi.kube.api import call_json
from zerofs_csi.observability.logs import JsonFormatter
from zerofs_csi.servers.pods import objects
from zerofs_csi.servers.pods.backend import KubernetesBackend
from zerofs_csi.servers.pods.owner import resolve_daemonset_owner
from zerofs_csi.servers.pods.status import pod_is_ready
from zerofs_csi.volume.secrets import VolumeSecrets

MakeBackend = Callable[..., KubernetesBackend]
StartKubelet = Callable[..., KubeletStandIn]


class RecordingCore(client.CoreV1Api):
    """CoreV1Api that counts the calls the tests care about and can run a hook
    before a Secret update (to play a concurrent writer)."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api)
        self.pod_creates = 0
        self.secret_replaces = 0
        self.before_secret_replace: Callable[[int], None] | None = None

    def create_namespaced_pod(self, *args: Any, **kwargs: Any) -> Any:
        self.pod_creates += 1
        return super().create_namespaced_pod(*args, **kwargs)

    def replace_namespaced_secret(self, *args: Any, **kwargs: Any) -> Any:
        self.secret_replaces += 1
        if self.before_secret_replace is not None:
            self.before_secret_replace(self.secret_replaces)
        return super().replace_namespaced_secret(*args, **kwargs)


def read_pod(admin: client.ApiClient, cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return call_json(client.CoreV1Api(admin).read_namespaced_pod, name, cluster.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def read_secret(admin: client.ApiClient, cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return call_json(client.CoreV1Api(admin).read_namespaced_secret, name, cluster.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- ensure


def test_ensure_starts_a_ready_pod_with_its_config_secret(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelet = kubelets()
    backend = make_backend()
    volume = new_volume_id()

    sockets = backend.ensure(volume, volume_settings(), SECRETS)

    assert sockets == backend.sockets(volume)
    assert sockets.nbd.is_socket() and sockets.ninep.is_socket()
    pod = read_pod(admin, cluster, objects.pod_name(volume))
    assert pod is not None and pod_is_ready(pod)
    assert pod["spec"]["nodeName"] == NODE
    labels = pod["metadata"]["labels"]
    assert labels[objects.LABEL_VOLUME] == volume and labels[objects.LABEL_NODE] == NODE
    secret = read_secret(admin, cluster, objects.secret_name(volume))
    assert secret is not None
    config = decoded(secret)[objects.CONFIG_KEY]
    assert f'unix_socket = "{sockets.nbd}"' in config
    # The admin service too, beside the others: the node plugin checkpoints through it.
    assert f'unix_socket = "{sockets.admin}"' in config
    assert "s3://zerofs-test/volumes/" + volume in config
    assert [entry[2] for entry in kubelet.journal] == ["started", "ready"]
    assert backend.running() == [volume]
    assert kubelet.errors == []


def test_ready_pod_is_reused_without_a_second_create(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelets()
    core = RecordingCore(cluster.api_client())
    backend = make_backend(core=core)
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    first = read_pod(admin, cluster, objects.pod_name(volume))

    started = time.monotonic()
    backend.ensure(volume, volume_settings(), SECRETS)
    elapsed = time.monotonic() - started

    second = read_pod(admin, cluster, objects.pod_name(volume))
    assert first is not None and second is not None
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert core.pod_creates == 1
    assert core.secret_replaces == 0
    # Already ready: answered from the first list, no waiting.
    assert elapsed < 5.0


def test_existing_pod_not_yet_ready_is_awaited_not_recreated(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    core = RecordingCore(cluster.api_client())
    backend = make_backend(core=core)
    volume = new_volume_id()
    # The first attempt times out: no kubelet runs the pod yet.
    with pytest.raises(errors.DeadlineExceeded):
        backend.ensure(volume, volume_settings(podReadyTimeoutSeconds="1"), SECRETS)
    pod = read_pod(admin, cluster, objects.pod_name(volume))
    assert pod is not None and not pod_is_ready(pod)

    kubelets()
    backend.ensure(volume, volume_settings(podReadyTimeoutSeconds="1"), SECRETS)

    again = read_pod(admin, cluster, objects.pod_name(volume))
    assert again is not None and pod_is_ready(again)
    assert again["metadata"]["uid"] == pod["metadata"]["uid"]
    assert core.pod_creates == 1


def test_secret_update_conflict_is_retried_from_a_fresh_read(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelets()
    core = RecordingCore(cluster.api_client())
    backend = make_backend(core=core)
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    name = objects.secret_name(volume)

    def concurrent_writer(attempt: int) -> None:
        # Between the backend's read and its write, someone else updates the Secret.
        if attempt != 1:
            return
        current = read_secret(admin, cluster, name)
        assert current is not None
        current["metadata"].setdefault("annotations", {})["example.com/touched-by"] = "other"
        current["data"]["config.toml"] = base64.b64encode(b"stale = true\n").decode()
        call_json(
            client.CoreV1Api(admin).replace_namespaced_secret, name, cluster.namespace, current
        )

    core.before_secret_replace = concurrent_writer
    rotated = VolumeSecrets(
        encryption_password="pw-rotated-Qm3Lx0-never-logged",
        access_key_id=SECRETS.access_key_id,
        secret_access_key=SECRETS.secret_access_key,
    )
    backend.ensure(volume, volume_settings(), rotated)

    assert core.secret_replaces == 2  # the conflicting write, then one from a fresh read
    secret = read_secret(admin, cluster, name)
    assert secret is not None
    values = decoded(secret)
    assert values["ZEROFS_CSI_ENCRYPTION_PASSWORD"] == rotated.encryption_password
    assert "stale = true" not in values[objects.CONFIG_KEY]
    assert "[storage]" in values[objects.CONFIG_KEY]
    # The other writer's change to a field the driver does not own survived.
    assert secret["metadata"]["annotations"]["example.com/touched-by"] == "other"


def test_secret_conflicts_that_never_stop_end_in_aborted(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelets()
    core = RecordingCore(cluster.api_client())
    backend = make_backend(core=core, conflict_retries=3, conflict_backoff=0.01)
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    name = objects.secret_name(volume)

    def always_interfere(attempt: int) -> None:
        current = read_secret(admin, cluster, name)
        assert current is not None
        current["metadata"].setdefault("annotations", {})["example.com/attempt"] = str(attempt)
        call_json(
            client.CoreV1Api(admin).replace_namespaced_secret, name, cluster.namespace, current
        )

    core.before_secret_replace = always_interfere
    other = VolumeSecrets(encryption_password="pw-other-Zt5Yw1-never-logged")
    with pytest.raises(errors.Aborted, match="3 update attempts"):
        backend.ensure(volume, volume_settings(), other)
    assert core.secret_replaces == 3


def test_pod_of_an_older_configuration_is_gone_before_the_new_one_starts(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelet = kubelets(stop_delay=0.5)
    backend = make_backend()
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    old = read_pod(admin, cluster, objects.pod_name(volume))

    backend.ensure(volume, volume_settings(cacheDiskSizeGb="2"), SECRETS)

    new = read_pod(admin, cluster, objects.pod_name(volume))
    assert old is not None and new is not None
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    hash_key = objects.ANNOTATION_CONFIG_HASH
    assert new["metadata"]["annotations"][hash_key] != old["metadata"]["annotations"][hash_key]
    deleted = [e for e in kubelet.actions("deleted") if e[4] == old["metadata"]["uid"]]
    started = [e for e in kubelet.actions("started") if e[4] == new["metadata"]["uid"]]
    assert deleted and started and deleted[0][0] < started[0][0]


def test_pod_of_a_fenced_server_is_replaced_at_the_next_stage(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    """Its guard keeps a fenced ZeroFS from starting again (objects.FENCE_GUARD_SCRIPT);
    a NodeStage here gives the volume back to this node: a new pod, without the mark."""
    kubelet = kubelets(stop_delay=0.5)
    backend = make_backend()
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    old = read_pod(admin, cluster, objects.pod_name(volume))
    backend.sockets(volume).fenced.touch()

    backend.ensure(volume, volume_settings(), SECRETS)

    new = read_pod(admin, cluster, objects.pod_name(volume))
    assert old is not None and new is not None
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert not backend.sockets(volume).fenced.exists()
    deleted = [e for e in kubelet.actions("deleted") if e[4] == old["metadata"]["uid"]]
    started = [e for e in kubelet.actions("started") if e[4] == new["metadata"]["uid"]]
    assert deleted and started and deleted[0][0] < started[0][0]


def test_pod_on_another_node_is_replaced_only_after_it_is_gone(
    cluster: Cluster,
    admin: client.ApiClient,
    make_backend: MakeBackend,
    kubelets: StartKubelet,
    socket_root: Path,
) -> None:
    volume = new_volume_id()
    # The volume's server still runs on the node it was attached to before.
    other_kubelet = kubelets(OTHER_NODE, stop_delay=1.0)
    elsewhere = make_backend(node_name=OTHER_NODE, socket_root=socket_root / "b")
    elsewhere.ensure(volume, volume_settings(), SECRETS)
    old = read_pod(admin, cluster, objects.pod_name(volume))
    assert old is not None and old["spec"]["nodeName"] == OTHER_NODE

    here_kubelet = kubelets(NODE)
    backend = make_backend()
    backend.ensure(volume, volume_settings(), SECRETS)

    new = read_pod(admin, cluster, objects.pod_name(volume))
    assert new is not None and new["spec"]["nodeName"] == NODE and pod_is_ready(new)
    journal = other_kubelet.journal  # shared by both stand-ins, in time order
    assert journal is here_kubelet.journal
    order = [(node, action, uid) for _, node, action, _, uid in journal]
    old_gone = order.index((OTHER_NODE, "deleted", old["metadata"]["uid"]))
    new_started = order.index((NODE, "started", new["metadata"]["uid"]))
    assert old_gone < new_started
    assert elsewhere.running() == [] and backend.running() == [volume]


def test_pod_left_by_the_go_driver_is_replaced(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelet = kubelets()
    volume = new_volume_id()
    # Same name, none of this driver's labels or annotations.
    legacy = {
        "metadata": {"name": objects.pod_name(volume), "labels": {"app": "zerofs-volume"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "zerofs", "image": "zerofs:0.16"}]},
    }
    old = call_json(client.CoreV1Api(admin).create_namespaced_pod, cluster.namespace, legacy)

    make_backend().ensure(volume, volume_settings(), SECRETS)

    new = read_pod(admin, cluster, objects.pod_name(volume))
    assert new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
    assert new["metadata"]["labels"][objects.LABEL_VOLUME] == volume
    assert (NODE, "deleted", old["metadata"]["uid"]) in [
        (node, action, uid) for _, node, action, _, uid in kubelet.journal
    ]


# ---------------------------------------------------------------- readiness timeout


def test_ready_timeout_quotes_phase_conditions_and_events(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    pending = PendingStatus()
    kubelets(become_ready=False, pending=pending)
    backend = make_backend()
    volume = new_volume_id()

    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        backend.ensure(volume, volume_settings(podReadyTimeoutSeconds="2"), SECRETS)
    elapsed = time.monotonic() - started

    message = caught.value.message
    assert 2.0 <= elapsed < 8.0
    assert f"pod {cluster.namespace}/{objects.pod_name(volume)} not ready after 2s" in message
    assert "phase Pending" in message
    assert "Ready=False (ContainersNotReady" in message
    assert f"container zerofs: waiting ({pending.reason}" in message
    assert f"Warning {pending.event_reason}: {pending.event_message} (x3)" in message


# ---------------------------------------------------------------- removal


def test_stop_deletes_gracefully_then_removes_the_secret(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelet = kubelets(stop_delay=0.3)
    registry = CollectorRegistry()
    backend = make_backend(registry=registry)
    volume = new_volume_id()
    sockets = backend.ensure(volume, volume_settings(), SECRETS)

    backend.stop(volume)

    assert read_pod(admin, cluster, objects.pod_name(volume)) is None
    assert read_secret(admin, cluster, objects.secret_name(volume)) is None
    assert not sockets.directory.exists()
    assert len(kubelet.actions("deleted")) == 1
    labels = {"node": NODE}
    assert sample(registry, "zerofs_csi_server_removals_total", outcome="graceful", **labels) == 1
    assert sample(registry, "zerofs_csi_forced_pod_deletions_total", **labels) == 0
    # Stopping what is not running succeeds.
    backend.stop(volume)
    assert sample(registry, "zerofs_csi_server_removals_total", outcome="absent", **labels) == 1


def test_pod_stuck_terminating_is_force_deleted_after_the_timeout(
    cluster: Cluster,
    admin: client.ApiClient,
    make_backend: MakeBackend,
    kubelets: StartKubelet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubelet = kubelets(finish_deletions=False)
    registry = CollectorRegistry()
    backend = make_backend(registry=registry, removal_timeout=1.5)
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)

    caplog.set_level(logging.INFO, logger="zerofs_csi.servers.pods")
    started = time.monotonic()
    backend.stop(volume)
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 8.0
    assert [entry[2] for entry in kubelet.journal][-1] == "ignored_deletion"
    assert read_pod(admin, cluster, objects.pod_name(volume)) is None
    assert read_secret(admin, cluster, objects.secret_name(volume)) is None
    labels = {"node": NODE}
    assert sample(registry, "zerofs_csi_forced_pod_deletions_total", **labels) == 1
    assert sample(registry, "zerofs_csi_server_removals_total", outcome="forced", **labels) == 1
    steps = [(r.__dict__.get("step"), r.__dict__.get("outcome")) for r in caplog.records]
    assert ("force_delete_pod", None) in steps and ("force_delete_pod", "forced") in steps


def test_stop_leaves_the_servers_of_other_nodes_alone(
    cluster: Cluster,
    admin: client.ApiClient,
    make_backend: MakeBackend,
    kubelets: StartKubelet,
    socket_root: Path,
) -> None:
    kubelets(OTHER_NODE)
    volume = new_volume_id()
    make_backend(node_name=OTHER_NODE, socket_root=socket_root / "b").ensure(
        volume, volume_settings(), SECRETS
    )

    make_backend().stop(volume)

    pod = read_pod(admin, cluster, objects.pod_name(volume))
    assert pod is not None and pod["spec"]["nodeName"] == OTHER_NODE
    assert pod["metadata"].get("deletionTimestamp") is None
    # Its server still needs the config Secret.
    assert read_secret(admin, cluster, objects.secret_name(volume)) is not None


def test_remove_everywhere_removes_every_nodes_server_and_the_secret(
    cluster: Cluster,
    admin: client.ApiClient,
    make_backend: MakeBackend,
    kubelets: StartKubelet,
    socket_root: Path,
) -> None:
    """What DeleteVolume calls: no server of a deleted volume may keep running anywhere."""
    kubelets(OTHER_NODE, stop_delay=0.2)
    volume = new_volume_id()
    make_backend(node_name=OTHER_NODE, socket_root=socket_root / "b").ensure(
        volume, volume_settings(), SECRETS
    )
    assert read_pod(admin, cluster, objects.pod_name(volume)) is not None

    controller_side = make_backend()  # a different node name: the controller's view
    controller_side.remove_everywhere(volume)

    assert read_pod(admin, cluster, objects.pod_name(volume)) is None
    assert read_secret(admin, cluster, objects.secret_name(volume)) is None
    controller_side.remove_everywhere(volume)  # nothing left: still succeeds


# ---------------------------------------------------------------- ownership


def test_owner_reference_is_the_daemonset_read_back_from_the_api(
    cluster: Cluster, admin: client.ApiClient, make_backend: MakeBackend, kubelets: StartKubelet
) -> None:
    kubelets()
    volume = new_volume_id()
    make_backend().ensure(volume, volume_settings(), SECRETS)
    daemonset = call_json(
        client.AppsV1Api(admin).read_namespaced_daemon_set, DAEMONSET, cluster.namespace
    )

    for obj in (
        read_pod(admin, cluster, objects.pod_name(volume)),
        read_secret(admin, cluster, objects.secret_name(volume)),
    ):
        assert obj is not None
        (reference,) = obj["metadata"]["ownerReferences"]
        assert reference["apiVersion"] == "apps/v1"
        assert reference["kind"] == "DaemonSet"
        assert reference["name"] == daemonset["metadata"]["name"] == DAEMONSET
        assert reference["uid"] == daemonset["metadata"]["uid"]
        # Not a controller reference: the DaemonSet controller would release the pod
        # (its selector does not match) and garbage collection would no longer apply.
        assert reference["controller"] is False
        assert reference["blockOwnerDeletion"] is True
    pod = read_pod(admin, cluster, objects.pod_name(volume))
    assert pod is not None
    assert not objects.selector_matches(daemonset["spec"]["selector"], pod["metadata"]["labels"])


def test_daemonset_found_from_the_plugin_pod(
    cluster: Cluster,
    admin: client.ApiClient,
    daemonset: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin_pod = {
        "metadata": {
            "name": "zerofs-csi-node-x7k2p",
            "labels": dict(DAEMONSET_LABELS),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": DAEMONSET,
                    "uid": daemonset["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "plugin", "image": "zerofs-csi:t"}]},
    }
    call_json(client.CoreV1Api(admin).create_namespaced_pod, cluster.namespace, plugin_pod)

    owner = resolve_daemonset_owner(admin, cluster.namespace, pod_name="zerofs-csi-node-x7k2p")

    assert (owner.name, owner.uid) == (DAEMONSET, daemonset["metadata"]["uid"])
    monkeypatch.setenv("POD_NAME", "zerofs-csi-node-x7k2p")
    assert resolve_daemonset_owner(admin, cluster.namespace) == owner
    monkeypatch.delenv("POD_NAME")
    with pytest.raises(errors.FailedPrecondition, match="--daemonset-name"):
        resolve_daemonset_owner(admin, cluster.namespace)
    with pytest.raises(errors.NotFound, match="DaemonSet"):
        resolve_daemonset_owner(admin, cluster.namespace, daemonset_name="missing")


def test_daemonset_whose_selector_matches_the_server_pods_is_refused(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    labels = {objects.LABEL_MANAGED_BY: objects.MANAGED_BY}
    body = {
        "metadata": {"name": "greedy"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "plugin", "image": "zerofs-csi:t"}]},
            },
        },
    }
    call_json(client.AppsV1Api(admin).create_namespaced_daemon_set, cluster.namespace, body)
    with pytest.raises(errors.FailedPrecondition, match="would adopt"):
        resolve_daemonset_owner(admin, cluster.namespace, daemonset_name="greedy")


# ---------------------------------------------------------------- secrets


def test_secret_values_never_leave_the_secret(
    cluster: Cluster,
    admin: client.ApiClient,
    make_backend: MakeBackend,
    kubelets: StartKubelet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_values = [
        value
        for value in (SECRETS.encryption_password, SECRETS.access_key_id, SECRETS.secret_access_key)
        if value
    ]
    kubelets(become_ready=False, pending=PendingStatus())
    backend = make_backend(removal_timeout=1.0)
    volume = new_volume_id()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        backend.ensure(volume, volume_settings(podReadyTimeoutSeconds="1"), SECRETS)
    pod = read_pod(admin, cluster, objects.pod_name(volume))
    events = call_json(client.CoreV1Api(admin).list_namespaced_event, cluster.namespace)
    secret = read_secret(admin, cluster, objects.secret_name(volume))
    backend.stop(volume)

    formatter = JsonFormatter()
    logs = "\n".join(formatter.format(record) for record in caplog.records)
    places = {
        "pod": json.dumps(pod),
        "events": json.dumps(events),
        "error": str(caught.value),
        "logs": logs,
    }
    for where, text in places.items():
        for value in secret_values:
            assert value not in text, f"a secret value appears in the {where}"
    # The values did reach the Secret, referenced from the pod by name only.
    assert secret is not None
    assert set(secret_values) <= set(decoded(secret).values())
    env = pod["spec"]["containers"][0]["env"] if pod else []
    assert {e["name"] for e in env if "valueFrom" in e} == {
        "ZEROFS_CSI_ENCRYPTION_PASSWORD",
        "ZEROFS_CSI_AWS_ACCESS_KEY_ID",
        "ZEROFS_CSI_AWS_SECRET_ACCESS_KEY",
    }
    assert all(e["name"] == "RUST_LOG" for e in env if "value" in e)


# ---------------------------------------------------------------- input checks


def test_bad_inputs_are_refused_before_any_api_call(
    cluster: Cluster, make_backend: MakeBackend
) -> None:
    core = RecordingCore(cluster.api_client())
    backend = make_backend(core=core)
    with pytest.raises(errors.InvalidArgument, match="volume id"):
        backend.ensure("Bad/Id", volume_settings(), SECRETS)
    with pytest.raises(errors.Internal, match="VolumeSettings"):
        backend.ensure(new_volume_id(), {"storageUrl": "s3://x"}, SECRETS)
    with pytest.raises(errors.InvalidArgument, match="volume id"):
        backend.stop("../etc")
    assert core.pod_creates == 0 and core.secret_replaces == 0
