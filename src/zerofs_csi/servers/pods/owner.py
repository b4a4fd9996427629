"""The node DaemonSet that owns the per-volume objects.

Its name comes from ``--daemonset-name`` when given, otherwise from the node plugin's
own pod (``pod_name``, by default the ``POD_NAME`` environment variable that the
chart sets from the downward API's metadata.name): the DaemonSet reference in that
pod's ownerReferences. Either way the DaemonSet is then read from the API, so the owner
reference carries its real uid: a wrong uid would let the garbage collector delete the
per-volume pods at once, as their owner would not exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.kube.api import api_failure, call_json
from zerofs_csi.servers.pods import objects

POD_NAME_ENV = "POD_NAME"


@dataclass(frozen=True)
class DaemonSetOwner:
    name: str
    uid: str

    def reference(self) -> objects.Manifest:
        return objects.daemonset_owner_reference(self.name, self.uid)


def resolve_daemonset_owner(
    api: client.ApiClient,
    namespace: str,
    *,
    daemonset_name: str | None = None,
    pod_name: str | None = None,
) -> DaemonSetOwner:
    """Read the node DaemonSet and check that it cannot adopt the per-volume pods.

    Raises FailedPrecondition when neither a name nor the plugin's pod identify it,
    when the pod has no DaemonSet owner, or when the DaemonSet's selector matches the
    per-volume pods' labels (its controller would take them for its own pods and
    delete them as surplus).
    """
    if not daemonset_name:
        pod_name = pod_name or os.environ.get(POD_NAME_ENV)
        if not pod_name:
            raise errors.FailedPrecondition(
                "cannot tell which DaemonSet owns the volume server pods: set "
                "--daemonset-name, or POD_NAME (downward API metadata.name) in the node "
                "plugin's pod"
            )
        daemonset_name = _daemonset_of_pod(api, namespace, pod_name)
    try:
        daemonset = call_json(
            client.AppsV1Api(api).read_namespaced_daemon_set, daemonset_name, namespace
        )
    except Exception as exc:
        raise api_failure(exc, f"reading DaemonSet {namespace}/{daemonset_name}") from None
    selector = (daemonset.get("spec") or {}).get("selector")
    sample = objects.volume_labels("sample-volume", "sample-node")
    if objects.selector_matches(selector, sample):
        raise errors.FailedPrecondition(
            f"the selector of DaemonSet {namespace}/{daemonset_name} matches the volume server "
            f"pods' labels {sorted(sample)}: its controller would adopt and delete them; "
            "give the DaemonSet a selector with its own component label"
        )
    metadata = daemonset.get("metadata") or {}
    return DaemonSetOwner(name=str(metadata.get("name")), uid=str(metadata.get("uid")))


def _daemonset_of_pod(api: client.ApiClient, namespace: str, pod_name: str) -> str:
    try:
        pod = call_json(client.CoreV1Api(api).read_namespaced_pod, pod_name, namespace)
    except Exception as exc:
        raise api_failure(exc, f"reading the node plugin's pod {namespace}/{pod_name}") from None
    for reference in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("kind") == "DaemonSet" and reference.get("apiVersion") == "apps/v1":
            return str(reference["name"])
    raise errors.FailedPrecondition(
        f"pod {namespace}/{pod_name} is not owned by a DaemonSet; set --daemonset-name"
    )
