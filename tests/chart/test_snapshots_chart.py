"""The chart's snapshot objects (values ``snapshots``): the csi-snapshotter sidecar in the
controller pod, its ClusterRole bound to the controller's account, and the
VolumeSnapshotClass, present exactly when asked for or (``auto``) when the cluster
serves the snapshot API."""

from __future__ import annotations

from typing import Any

import pytest

from chart.conftest import CHART, NAMESPACE, Helm, Manifest

SNAPSHOT_API = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass"


def _named(manifests: list[Manifest], kind: str, suffix: str) -> Manifest | None:
    return next(
        (m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(suffix)),
        None,
    )


def _objects(manifests: list[Manifest]) -> dict[str, Any]:
    controller = next(m for m in manifests if m["kind"] == "Deployment")
    containers = {c["name"]: c for c in controller["spec"]["template"]["spec"]["containers"]}
    return {
        "sidecar": containers.get("csi-snapshotter"),
        "role": _named(manifests, "ClusterRole", "-snapshotter"),
        "binding": _named(manifests, "ClusterRoleBinding", "-snapshotter"),
        "class": _named(manifests, "VolumeSnapshotClass", ""),
        "account": controller["spec"]["template"]["spec"]["serviceAccountName"],
    }


@pytest.mark.parametrize(
    ("enabled", "cluster_has_the_api", "rendered"),
    [
        ("auto", False, False),
        ("auto", True, True),
        ("true", False, True),
        ("false", True, False),
    ],
)
def test_snapshot_objects_follow_the_value_and_the_cluster(
    helm: Helm, enabled: str, cluster_has_the_api: bool, rendered: bool
) -> None:
    manifests = helm.render(
        CHART,
        sets=[f"snapshots.enabled={enabled}"],
        api_versions=[SNAPSHOT_API] if cluster_has_the_api else [],
    )
    found = _objects(manifests)
    present = {name: found[name] is not None for name in ("sidecar", "role", "binding", "class")}
    assert present == dict.fromkeys(present, rendered)


def test_the_sidecar_its_rights_and_the_class(helm: Helm) -> None:
    found = _objects(helm.render(CHART, api_versions=[SNAPSHOT_API]))
    sidecar = found["sidecar"]
    assert sidecar["image"] == "registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0"
    assert "--csi-address=/csi/csi.sock" in sidecar["args"]
    assert "--leader-election" in sidecar["args"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
        for r in found["role"]["rules"]
    }
    group = ("snapshot.storage.k8s.io",)
    content_verbs = {"get", "list", "watch", "update", "patch"}
    assert rules[(group, ("volumesnapshotcontents",))] >= content_verbs
    assert rules[(group, ("volumesnapshotcontents/status",))] >= {"update", "patch"}
    assert rules[(group, ("volumesnapshotclasses",))] == {"get", "list", "watch"}
    # It creates no snapshots of its own: VolumeSnapshots are the snapshot controller's.
    assert not any("volumesnapshots" in r["resources"] for r in found["role"]["rules"])
    assert found["binding"]["roleRef"]["name"] == found["role"]["metadata"]["name"]
    assert found["binding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": found["account"], "namespace": NAMESPACE}
    ]
    snapshot_class = found["class"]
    assert snapshot_class["driver"] == "zerofs.csi.driver"
    assert snapshot_class["deletionPolicy"] == "Delete"
    assert "annotations" not in snapshot_class["metadata"]


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_the_provisioner_reads_snapshots_exactly_when_they_are_enabled(
    helm: Helm, enabled: str
) -> None:
    manifests = helm.render(CHART, sets=[f"snapshots.enabled={enabled}"])
    role = _named(manifests, "ClusterRole", "-provisioner")
    assert role is not None
    snapshot_rules = [r for r in role["rules"] if r["apiGroups"] == ["snapshot.storage.k8s.io"]]
    if enabled == "false":
        assert snapshot_rules == []
    else:
        # A claim restored from a VolumeSnapshot: the snapshot, kept by the provisioner's
        # finalizer until the claim is provisioned, then its content's handle.
        group = ["snapshot.storage.k8s.io"]
        assert snapshot_rules == [
            {
                "apiGroups": group,
                "resources": ["volumesnapshots"],
                "verbs": ["get", "list", "watch", "update"],
            },
            {"apiGroups": group, "resources": ["volumesnapshotcontents"], "verbs": ["get", "list"]},
        ]


def test_the_class_can_be_the_default_keep_its_checkpoints_or_be_left_out(helm: Helm) -> None:
    found = _objects(
        helm.render(
            CHART,
            api_versions=[SNAPSHOT_API],
            sets=[
                "snapshots.volumeSnapshotClass.isDefault=true",
                "snapshots.volumeSnapshotClass.deletionPolicy=Retain",
                "snapshots.volumeSnapshotClass.name=zerofs-retain",
            ],
        )
    )
    assert found["class"]["metadata"]["name"] == "zerofs-retain"
    assert found["class"]["deletionPolicy"] == "Retain"
    assert found["class"]["metadata"]["annotations"] == {
        "snapshot.storage.kubernetes.io/is-default-class": "true"
    }
    found = _objects(
        helm.render(
            CHART, api_versions=[SNAPSHOT_API], sets=["snapshots.volumeSnapshotClass.create=false"]
        )
    )
    assert found["class"] is None and found["sidecar"] is not None


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["snapshots.enabled=maybe"], "snapshots.enabled"),
        (["snapshots.volumeSnapshotClass.deletionPolicy=Keep"], "deletionPolicy"),
    ],
)
def test_a_wrong_snapshot_value_fails_naming_it(helm: Helm, sets: list[str], message: str) -> None:
    result = helm.template(CHART, sets=sets, api_versions=[SNAPSHOT_API])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "secret"),
    [
        ([], None),
        (["secret.encryptionPassword=pw"], ("zerofs-zerofs-csi-secret", NAMESPACE)),
        (["secret.existingSecret=creds"], ("creds", NAMESPACE)),
        (
            [
                "secret.existingSecret=creds",
                "snapshots.volumeSnapshotClass.secretName=snapshot-creds",
                "snapshots.volumeSnapshotClass.secretNamespace=team-a",
            ],
            ("snapshot-creds", "team-a"),
        ),
    ],
    ids=["no-secret", "chart-secret", "existing-secret", "own-secret"],
)
def test_the_class_names_the_snapshotter_secret_the_controller_may_read(
    helm: Helm, sets: list[str], secret: tuple[str, str] | None
) -> None:
    manifests = helm.render(CHART, sets=["snapshots.enabled=true", *sets])
    found = _objects(manifests)
    parameters = found["class"].get("parameters") or {}
    if secret is None:
        # A volume staged nowhere then cannot be snapshotted: nothing to start its server.
        assert parameters == {}
        return
    name, namespace = secret
    assert parameters == {
        "csi.storage.k8s.io/snapshotter-secret-name": name,
        "csi.storage.k8s.io/snapshotter-secret-namespace": namespace,
    }
    # The csi-snapshotter reads it with the controller's account, which a Role lets get it.
    roles = [
        m
        for m in manifests
        if m["kind"] == "Role"
        and m["metadata"]["name"].endswith("-secrets")
        and m["metadata"]["namespace"] == namespace
    ]
    assert len(roles) == 1, roles
    (rule,) = roles[0]["rules"]
    assert name in rule["resourceNames"] and rule["verbs"] == ["get"]
