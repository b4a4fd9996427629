"""The node plugin's RBAC rules cover exactly what the backend calls.

The whole lifecycle runs under the node plugin's identity. Against the fake API server,
every request it served to the backend's client is checked against the rules, and every
rule must have been used. Against a real API server (envtest) the backend runs with the
token of a user bound to a Role made from the same rules, so the server's own
authorizer refuses anything they do not grant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from kube.cluster import DAEMONSET, DAEMONSET_LABELS, NODE, NODE_PLUGIN_USER, OTHER_NODE, Cluster
from kube.conftest import BACKEND_USER_AGENT, SECRETS, new_volume_id, volume_settings
from kube.kubelet import KubeletStandIn
from zerofs_csi import errors
from zerofs_csi.kube import rbac
from zerofs_csi.kube.api import call_json
from zerofs_csi.servers.pods.backend import KubernetesBackend
from zerofs_csi.servers.pods.owner import resolve_daemonset_owner
from zerofs_csi.volume.secrets import VolumeSecrets

# Granted for an admission plugin, never called (see rbac.py).
NOT_CALLED = {("update", "apps", "daemonsets/finalizers")}
# The checkpoint request worker's, not the backend's: test_checkpoint_requests.py.
WORKER_CALLS = {
    (verb, group, resource)
    for rule in rbac.CHECKPOINT_REQUEST_RULES
    for group in rule["apiGroups"]
    for resource in rule["resources"]
    for verb in rule["verbs"]
}


def _node_plugin_client(cluster: Cluster, admin: client.ApiClient) -> client.ApiClient:
    if cluster.kind == "real":
        role = {"metadata": {"name": "zerofs-csi-node"}, "rules": list(rbac.NODE_PLUGIN_RULES)}
        binding = {
            "metadata": {"name": "zerofs-csi-node"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "zerofs-csi-node",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NODE_PLUGIN_USER}
            ],
        }
        authz = client.RbacAuthorizationV1Api(admin)
        call_json(authz.create_namespaced_role, cluster.namespace, role)
        call_json(authz.create_namespaced_role_binding, cluster.namespace, binding)
        api = cluster.api_client(cluster.user_tokens[NODE_PLUGIN_USER])
    else:
        api = cluster.api_client()
    api.user_agent = BACKEND_USER_AGENT
    return api


def test_the_lifecycle_needs_nothing_beyond_the_node_plugin_rules(
    cluster: Cluster,
    admin: client.ApiClient,
    daemonset: dict[str, Any],
    make_backend: Callable[..., KubernetesBackend],
    kubelets: Callable[..., KubeletStandIn],
) -> None:
    plugin_pod = {
        "metadata": {
            "name": "zerofs-csi-node-abcde",
            "labels": dict(DAEMONSET_LABELS),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "name": DAEMONSET,
                    "uid": daemonset["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "plugin", "image": "zerofs-csi:t"}]},
    }
    call_json(client.CoreV1Api(admin).create_namespaced_pod, cluster.namespace, plugin_pod)
    api = _node_plugin_client(cluster, admin)
    kubelets(NODE)

    owner = resolve_daemonset_owner(api, cluster.namespace, pod_name="zerofs-csi-node-abcde")
    backend = make_backend(api=api, owner=owner)
    volume = new_volume_id()
    backend.ensure(volume, volume_settings(), SECRETS)
    rotated = VolumeSecrets(encryption_password="pw-rotated-for-rbac-test")
    backend.ensure(volume, volume_settings(), rotated)
    assert backend.running() == [volume]
    backend.stop(volume)
    # A server that never becomes ready (no kubelet on that node): the error quotes
    # the pod's events.
    elsewhere = make_backend(api=api, owner=owner, node_name=OTHER_NODE)
    with pytest.raises(errors.DeadlineExceeded, match="last events"):
        elsewhere.ensure(new_volume_id(), volume_settings(podReadyTimeoutSeconds="1"), SECRETS)

    if cluster.fake is None:
        return  # the real server authorized every call above
    served = {
        (call.verb, call.api_group, call.resource)
        for call in cluster.fake.calls
        if call.user_agent == BACKEND_USER_AGENT
    }
    uncovered = {call for call in served if not rbac.allows(*call)}
    assert uncovered == set()
    granted = {
        (verb, group, resource)
        for rule in rbac.NODE_PLUGIN_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted - served == NOT_CALLED | WORKER_CALLS


def test_rules_are_namespaced_and_never_wildcards() -> None:
    for rule in rbac.NODE_PLUGIN_RULES:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key]
        assert set(rule) == {"apiGroups", "resources", "verbs"}
    assert rbac.allows("get", "", "secrets")
    assert not rbac.allows("list", "", "secrets")
    assert not rbac.allows("get", "", "configmaps")
    assert not rbac.allows("get", "", "daemonsets")
