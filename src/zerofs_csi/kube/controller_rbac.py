"""The Kubernetes API access the controller plugin needs, as RBAC rules.

The controller role (``--role controller``) keeps one ConfigMap per volume,
``zerofs-meta-<volume id>``, in the driver's namespace (volume_store_kube): it reads
one by name, lists them by label for ListVolumes, creates, updates and deletes them
with resourceVersion preconditions. A StorageClass's ``configMapName`` is read with a
get in the same namespace. DeleteVolume removes the volume's server pods on every node
(list and watch them by label, delete) and its config Secret (delete): it never reads a
Secret. S3 credentials arrive in the CSI calls' secrets, which the external-provisioner
fetches. Snapshot records are ConfigMaps too, ``zerofs-snap-<key>``
(snapshot_store_kube); CreateSnapshot and DeleteSnapshot create, read and delete
CheckpointRequests (checkpoints_kube). Restores and checkpoints of volumes staged
nowhere run in job pods with their Secrets (job_pods_kube): it creates, reads and
deletes both, updates a pod's annotation at a step, and reads a restore's log for its
progress; DeleteVolume deletes job pods left behind, and a periodic sweep lists them to
delete those no call steps any more. ControllerPublishVolume reads the node's CSINode
(node_directory_kube): whether the node exists and runs this driver's node plugin, and
its attach limit.
Events go on the user's claims, in any namespace.

The Helm chart's controller Role renders exactly the namespaced rules, and its
controller ClusterRole exactly the cluster-scoped ones; tests/chart checks both, and
runs the controller as ``runtime.build_controller`` wires it against an API server
that records every request, so a call the rules do not grant fails there.
"""

from __future__ import annotations

from zerofs_csi import DRIVER_NAME
from zerofs_csi.kube.rbac import Rule

# Namespaced: bound with a Role in the driver's namespace.
CONTROLLER_PLUGIN_RULES: tuple[Rule, ...] = (
    # Volume records (zerofs-meta-<volume>) and configMapName ConfigMaps.
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "list", "create", "update", "delete"],
    },
    # DeleteVolume: the volume's server pods, wherever they run, gone before its data;
    # job pods (restores, checkpoints of volumes staged nowhere): created, followed,
    # marked at each step (update) and deleted, or swept when no call steps them.
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["get", "list", "watch", "create", "update", "delete"],
    },
    # ... a restore's progress, from its job container's log.
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # ... the volume's zerofs-config-<volume> Secret; a job pod's, created with it.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    # CreateSnapshot, DeleteSnapshot: the checkpoint requests the node plugins carry out
    # (kube.checkpoint_requests), read for their outcome and deleted once done.
    {
        "apiGroups": [DRIVER_NAME],
        "resources": ["checkpointrequests"],
        "verbs": ["get", "create", "delete"],
    },
)

# Cluster-scoped objects: bound with a ClusterRole.
CONTROLLER_PLUGIN_CLUSTER_RULES: tuple[Rule, ...] = (
    # ControllerPublishVolume: the node's CSINode (does it exist, its attach limit).
    {"apiGroups": ["storage.k8s.io"], "resources": ["csinodes"], "verbs": ["get"]},
    # Events on the user's claims, in any namespace: a restore's progress, a refused
    # clean-up of a volume's data (observability.events).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
)
