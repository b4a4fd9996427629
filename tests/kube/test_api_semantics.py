"""The API semantics the backend relies on, checked on both servers.

Run against a real kube-apiserver (envtest) these pin down the behaviour; run against
the fake they show that it behaves the same way.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubernetes import client, watch

from kube.cluster import NODE, Cluster
from zerofs_csi.kube.api import call_json


def core(admin: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(admin)


def bound_pod(name: str, grace: int = 30) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "probe"}},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "main", "image": "busybox:1.36"}],
        },
    }


def test_stale_update_conflicts_and_create_of_an_existing_name_is_refused(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    api = core(admin)
    secret = {"metadata": {"name": "s1"}, "stringData": {"k": "one"}}
    created = call_json(api.create_namespaced_secret, cluster.namespace, secret)
    assert created["data"] == {"k": "b25l"}
    with pytest.raises(client.ApiException) as exists:
        call_json(api.create_namespaced_secret, cluster.namespace, secret)
    assert exists.value.status == 409 and "AlreadyExists" in str(exists.value.body)

    created["data"] = {"k": "dHdv"}
    updated = call_json(api.replace_namespaced_secret, "s1", cluster.namespace, created)
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    with pytest.raises(client.ApiException) as stale:
        call_json(api.replace_namespaced_secret, "s1", cluster.namespace, created)
    assert stale.value.status == 409 and "Conflict" in str(stale.value.body)
    with pytest.raises(client.ApiException) as missing:
        call_json(api.read_namespaced_secret, "nope", cluster.namespace)
    assert missing.value.status == 404


def test_graceful_deletion_of_a_bound_pod_waits_for_the_final_delete(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    api = core(admin)
    pod = call_json(api.create_namespaced_pod, cluster.namespace, bound_pod("p1"))
    assert pod["status"]["phase"] == "Pending"
    uid = pod["metadata"]["uid"]

    call_json(api.delete_namespaced_pod, "p1", cluster.namespace)
    terminating = call_json(api.read_namespaced_pod, "p1", cluster.namespace)
    assert terminating["metadata"]["deletionTimestamp"]
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 30

    # A precondition on another uid does not delete it.
    with pytest.raises(client.ApiException) as wrong:
        call_json(
            api.delete_namespaced_pod,
            "p1",
            cluster.namespace,
            body={"gracePeriodSeconds": 0, "preconditions": {"uid": "0" * 8}},
        )
    assert wrong.value.status == 409
    call_json(
        api.delete_namespaced_pod,
        "p1",
        cluster.namespace,
        body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
        grace_period_seconds=0,
    )
    with pytest.raises(client.ApiException) as gone:
        call_json(api.read_namespaced_pod, "p1", cluster.namespace)
    assert gone.value.status == 404


def test_watch_from_a_resource_version_sees_later_changes_in_order(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    api = core(admin)
    pod = call_json(api.create_namespaced_pod, cluster.namespace, bound_pod("p2"))
    call_json(api.create_namespaced_pod, cluster.namespace, bound_pod("other"))
    since = pod["metadata"]["resourceVersion"]

    def later() -> None:
        time.sleep(0.3)
        current = call_json(api.read_namespaced_pod, "p2", cluster.namespace)
        current["status"] = {"phase": "Running"}
        call_json(api.replace_namespaced_pod_status, "p2", cluster.namespace, current)
        call_json(api.delete_namespaced_pod, "p2", cluster.namespace, grace_period_seconds=0)

    changer = threading.Thread(target=later)
    changer.start()
    seen = []
    stream = watch.Watch()
    for event in stream.stream(
        api.list_namespaced_pod,
        cluster.namespace,
        field_selector="metadata.name=p2",
        resource_version=since,
        timeout_seconds=10,
    ):
        seen.append((event["type"], event["raw_object"]["status"].get("phase")))
        if event["type"] == "DELETED":
            stream.stop()
    changer.join()
    assert seen == [("MODIFIED", "Running"), ("DELETED", "Running")]


def test_label_and_field_selectors(cluster: Cluster, admin: client.ApiClient) -> None:
    api = core(admin)
    for name, labels in (("a1", {"app": "x", "tier": "1"}), ("a2", {"app": "y"})):
        body = bound_pod(name)
        body["metadata"]["labels"] = labels
        call_json(api.create_namespaced_pod, cluster.namespace, body)

    def names(**selectors: str) -> list[str]:
        items = call_json(api.list_namespaced_pod, cluster.namespace, **selectors)["items"]
        return sorted(item["metadata"]["name"] for item in items)

    assert names(label_selector="app=x") == ["a1"]
    assert names(label_selector="app in (x,y),!tier") == ["a2"]
    assert names(label_selector="app!=x") == ["a2"]
    assert names(field_selector=f"spec.nodeName={NODE},metadata.name=a2") == ["a2"]
    assert names(field_selector="spec.nodeName=elsewhere") == []
