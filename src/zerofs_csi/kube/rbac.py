"""The Kubernetes API access the node plugin needs, as RBAC rules.

One source of truth for the Helm chart's Role and for the test that runs the backend
against an API server recording every call and checks each call is covered here. All
rules are namespaced: bind them with a Role in the driver's namespace, never a
ClusterRole binding. The node plugin reads no Secret other than the per-volume config
Secrets it writes; volume secrets arrive through the CSI calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from zerofs_csi import DRIVER_NAME

Rule = Mapping[str, Sequence[str]]

# The checkpoint requests of its node (node.checkpoint_requests): listed and watched,
# their outcome written into the status subresource. Only the controller creates and
# deletes them.
CHECKPOINT_REQUEST_RULES: tuple[Rule, ...] = (
    {"apiGroups": [DRIVER_NAME], "resources": ["checkpointrequests"], "verbs": ["list", "watch"]},
    {"apiGroups": [DRIVER_NAME], "resources": ["checkpointrequests/status"], "verbs": ["update"]},
)

NODE_PLUGIN_RULES: tuple[Rule, ...] = (
    # Per-volume ZeroFS pods: find (list/watch by label and node), wait for readiness
    # (watch), create, remove (delete, then delete with grace 0); get reads the plugin's
    # own pod to find its DaemonSet.
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    # zerofs-config-<volume>: read, create, update with resourceVersion, delete.
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get", "create", "update", "delete"],
    },
    # The pod's events, quoted in the error when it does not become ready.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    # The node DaemonSet: its uid goes into the per-volume objects' owner reference.
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]},
    # Not a call the plugin makes: with the OwnerReferencesPermissionEnforcement
    # admission plugin (OpenShift enables it), setting blockOwnerDeletion on a
    # reference to the DaemonSet requires update on its finalizers subresource.
    {"apiGroups": ["apps"], "resources": ["daemonsets/finalizers"], "verbs": ["update"]},
    *CHECKPOINT_REQUEST_RULES,
)


def allows(
    verb: str, api_group: str, resource: str, rules: Sequence[Rule] = NODE_PLUGIN_RULES
) -> bool:
    """Whether ``rules`` grant ``verb`` on ``resource`` (``pods`` or ``pods/status``)."""
    return any(
        api_group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )
