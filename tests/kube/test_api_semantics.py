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
    seen = watch_until_deleted(api, cluster.namespace, "p2", since)
    changer.join()
    # The delete writes deletionTimestamp (grace 0) before it removes the pod.
    assert seen == [
        ("MODIFIED", "Running", None),
        ("MODIFIED", "Running", 0),
        ("DELETED", "Running", 0),
    ]


def watch_until_deleted(
    api: client.CoreV1Api, namespace: str, name: str, since: str
) -> list[tuple[str, str | None, int | None]]:
    """(type, phase, deletionGracePeriodSeconds) of each change to the pod after ``since``."""
    seen = []
    stream = watch.Watch()
    for event in stream.stream(
        api.list_namespaced_pod,
        namespace,
        field_selector=f"metadata.name={name}",
        resource_version=since,
        timeout_seconds=10,
    ):
        pod = event["raw_object"]
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        seen.append((event["type"], pod["status"].get("phase"), grace))
        if event["type"] == "DELETED":
            stream.stop()
    return seen


@pytest.mark.parametrize(("bound", "expected_grace"), [(True, 30), (False, 0)])
def test_a_final_delete_of_a_terminating_pod_is_seen_as_an_update_then_a_delete(
    cluster: Cluster, admin: client.ApiClient, bound: bool, expected_grace: int
) -> None:
    api = core(admin)
    body = bound_pod("p3")
    if not bound:
        del body["spec"]["nodeName"]
    pod = call_json(api.create_namespaced_pod, cluster.namespace, body)
    since = pod["metadata"]["resourceVersion"]
    # A bound pod waits for its kubelet: deletionTimestamp and the pod's grace; the
    # second delete, the kubelet's, shortens the grace to 0. An unbound pod goes at once.
    call_json(api.delete_namespaced_pod, "p3", cluster.namespace)
    if bound:
        call_json(api.delete_namespaced_pod, "p3", cluster.namespace, grace_period_seconds=0)
    seen = watch_until_deleted(api, cluster.namespace, "p3", since)
    expected = [("MODIFIED", "Pending", 0), ("DELETED", "Pending", 0)]
    if bound:
        expected.insert(0, ("MODIFIED", "Pending", expected_grace))
    assert seen == expected


def test_a_negative_grace_period_is_one_second(cluster: Cluster, admin: client.ApiClient) -> None:
    api = core(admin)
    call_json(api.create_namespaced_pod, cluster.namespace, bound_pod("p4"))
    call_json(api.delete_namespaced_pod, "p4", cluster.namespace, grace_period_seconds=-5)
    pod = call_json(api.read_namespaced_pod, "p4", cluster.namespace)
    assert pod["metadata"]["deletionGracePeriodSeconds"] == 1


def test_lists_come_in_pages_of_limit_items_in_name_order(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    api = core(admin)
    names = [f"cm-{index}" for index in (3, 0, 4, 1, 2)]
    for name in names:
        body = {"metadata": {"name": name, "labels": {"page": "yes"}}, "data": {"k": name}}
        call_json(api.create_namespaced_config_map, cluster.namespace, body)
    other = {"metadata": {"name": "cm-other"}, "data": {}}
    call_json(api.create_namespaced_config_map, cluster.namespace, other)

    pages: list[list[str]] = []
    token = None
    while True:
        extra: dict[str, str] = {"_continue": token} if token else {}
        page = call_json(
            api.list_namespaced_config_map,
            cluster.namespace,
            label_selector="page=yes",
            limit=2,
            **extra,
        )
        pages.append([item["metadata"]["name"] for item in page["items"]])
        token = page["metadata"].get("continue")
        if not token:
            break
    assert pages == [["cm-0", "cm-1"], ["cm-2", "cm-3"], ["cm-4"]]

    # Without a selector the server also says how many items remain.
    first = call_json(api.list_namespaced_config_map, cluster.namespace, limit=4)
    assert len(first["items"]) == 4
    assert first["metadata"]["remainingItemCount"] == 2
    with pytest.raises(client.ApiException) as bad:
        call_json(api.list_namespaced_config_map, cluster.namespace, _continue="not-a-token")
    assert bad.value.status == 400


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
