"""The Helm charts: lint, render with realistic values, validate against the Kubernetes
schemas of every supported release, and check what the manifests tell the driver
against the driver's own code (flags, StorageClass parameters, secrets, RBAC, labels)."""

from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Any

import pytest

from chart.conftest import (
    CHART,
    DRIVER_VALUES,
    NAMESPACE,
    VALIDATION_CHART,
    VALIDATION_VALUES,
    VALUES_DIR,
    Helm,
    Manifest,
    all_containers,
    container,
    find,
    port_number,
    supported_versions,
)
from zerofs_csi import DRIVER_NAME
from zerofs_csi.cli import parse_config
from zerofs_csi.config import Backend, Role
from zerofs_csi.kube import rbac
from zerofs_csi.kube.controller_rbac import CONTROLLER_PLUGIN_RULES
from zerofs_csi.servers.pods import objects
from zerofs_csi.volume.secrets import (
    SECRET_ACCESS_KEY_ID,
    SECRET_CONDITIONAL_PUT_URL,
    SECRET_ENCRYPTION_PASSWORD,
    SECRET_SECRET_ACCESS_KEY,
    SECRET_SESSION_TOKEN,
    VolumeSecrets,
)
from zerofs_csi.volume.settings import PARAMETER_KEYS, RESERVED_PREFIXES, parse_volume_settings

NODE = "node-a"
CSI_SECRET_KEYS = {
    SECRET_ACCESS_KEY_ID,
    SECRET_SECRET_ACCESS_KEY,
    SECRET_SESSION_TOKEN,
    SECRET_ENCRYPTION_PASSWORD,
    SECRET_CONDITIONAL_PUT_URL,
}
# Kinds outside the Kubernetes API itself: the Prometheus Operator's CRDs.
CRD_API_VERSION = "monitoring.coreos.com/v1"


def _ids(values: str | None) -> str:
    return values or "defaults"


def _rules(role: Manifest) -> list[dict[str, list[str]]]:
    return [
        {key: list(rule[key]) for key in ("apiGroups", "resources", "verbs")}
        for rule in role["rules"]
    ]


def _pod_spec(manifest: Manifest) -> Manifest:
    return dict(manifest["spec"]["template"]["spec"])


# ------------------------------------------------------------------ lint and schemas


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_driver_chart_lints(helm: Helm, values: str | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["--values", str(VALUES_DIR / values)]
    result = helm.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALIDATION_VALUES, ids=_ids)
def test_validation_chart_lints(helm: Helm, values: str | None) -> None:
    args = ["lint", "--strict", str(VALIDATION_CHART)]
    if values:
        args += ["--values", str(VALUES_DIR / values)]
    result = helm.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("chart", "values"),
    [(CHART, v) for v in DRIVER_VALUES] + [(VALIDATION_CHART, v) for v in VALIDATION_VALUES],
    ids=[f"driver-{_ids(v)}" for v in DRIVER_VALUES]
    + [f"validation-{_ids(v)}" for v in VALIDATION_VALUES],
)
def test_every_manifest_matches_the_kubernetes_schemas(
    helm: Helm, kubernetes_validate: ModuleType, chart: Any, values: str | None
) -> None:
    versions = supported_versions(kubernetes_validate)
    problems = []
    validated = 0
    for version in versions:
        manifests = helm.render(chart, values, kube_version=f"{version}.0")
        assert manifests
        for manifest in manifests:
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
                validated += 1
            except kubernetes_validate.SchemaNotFoundError:
                if manifest["apiVersion"] != CRD_API_VERSION:
                    problems.append(f"{version} {name}: no schema for {manifest['apiVersion']}")
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{version} {name}: {exc.message}")
    assert problems == []
    assert validated >= len(versions)


def test_the_supported_range_reaches_the_newest_schemas(kubernetes_validate: ModuleType) -> None:
    versions = supported_versions(kubernetes_validate)
    assert versions[0] == "1.29"
    assert len(versions) >= 3


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_kinds_rendered(helm: Helm, values: str | None) -> None:
    kinds = {m["kind"] for m in helm.render(CHART, values)}
    assert {
        "CSIDriver",
        "Deployment",
        "DaemonSet",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    } <= kinds


# ------------------------------------------------------------------ wrong values


WRONG_VALUES = [
    (["controller.replicas=two"], "controller.replicas: Invalid type. Expected: integer"),
    (["controller.replicas=0"], "controller.replicas: Must be greater than or equal to 1"),
    (["logLevel=verbose"], "logLevel: logLevel must be one of the following"),
    (["driverName=Zerofs_CSI"], "driverName: Does not match pattern"),
    (["image.digest=sha256:abc"], "image.digest: Does not match pattern"),
    (["node.nbdModule.nbdsMax=0"], "node.nbdModule.nbdsMax: Must be greater than or equal to 1"),
    (["node.stateDir=relative/dir"], "node.stateDir: Does not match pattern"),
    (["controller.timeout=2 minutes"], "controller.timeout: Does not match pattern"),
    (["secret.awsAccessKeyId=AKIA"], "secret.awsSecretAccessKey: String length must be"),
    (["controllr.replicas=1"], "Additional property controllr is not allowed"),
    (
        [
            "secret.encryptionPassword=x",
            "storageClasses[0].name=zerofs",
            "storageClasses[0].storageUrl=https://bucket/x",
        ],
        "storageClasses[zerofs].storageUrl: expected an s3:// or s3a:// URL",
    ),
    (
        [
            "storageClasses[0].name=zerofs",
            "storageClasses[0].storageUrl=s3://bucket/x",
            "storageClasses[0].filesystem=ntfs",
        ],
        "storageClasses.0.filesystem: storageClasses.0.filesystem must be one of the following",
    ),
    (
        [
            "storageClasses[0].name=zerofs",
            "storageClasses[0].storageUrl=s3://bucket/x",
            "storageClasses[0].parameters.cacheSize=1",
        ],
        'Property name of "cacheSize" does not match',
    ),
    (
        [
            "storageClasses[0].name=zerofs",
            "storageClasses[0].storageUrl=s3://bucket/x",
            "storageClasses[0].s3Endpoint=http://minio:9000",
        ],
        "storageClasses.0: s3AllowHttp is required",
    ),
    (
        [
            "storageClasses[0].name=zerofs",
            "storageClasses[0].storageUrl=s3://bucket/x",
            "storageClasses[0].reclaimPolicy=Recycle",
        ],
        "storageClasses.0.reclaimPolicy: storageClasses.0.reclaimPolicy must be one of",
    ),
    # Checks across values that the schema cannot express fail in the templates.
    (
        ["storageClasses[0].name=zerofs", "storageClasses[0].storageUrl=s3://bucket/x"],
        "storageClasses[zerofs] uses the chart's Secret, and there is none",
    ),
    (["node.maxVolumesPerNode=500"], "node.maxVolumesPerNode (500) must be between 1 and"),
    (
        ["metrics.enabled=false", "metrics.serviceMonitor.enabled=true"],
        "metrics.serviceMonitor.enabled needs metrics.enabled",
    ),
]


@pytest.mark.parametrize(("sets", "message"), WRONG_VALUES, ids=[w[1][:40] for w in WRONG_VALUES])
def test_a_wrong_value_fails_with_a_clear_message(
    helm: Helm, sets: list[str], message: str
) -> None:
    result = helm.template(CHART, sets=sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------ RBAC


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_node_plugin_role_is_the_rbac_module_rules(helm: Helm, values: str | None) -> None:
    manifests = helm.render(CHART, values)
    role = find(manifests, "Role", "-node")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == [dict(rule) for rule in rbac.NODE_PLUGIN_RULES]


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_controller_plugin_role_is_the_controller_rbac_rules(
    helm: Helm, values: str | None
) -> None:
    manifests = helm.render(CHART, values)
    role = find(manifests, "Role", "-controller")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == [dict(rule) for rule in CONTROLLER_PLUGIN_RULES]


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_every_role_is_bound_to_the_service_account_of_its_pods(
    helm: Helm, values: str | None
) -> None:
    manifests = helm.render(CHART, values)
    accounts = {
        "controller": _pod_spec(find(manifests, "Deployment"))["serviceAccountName"],
        "node": _pod_spec(find(manifests, "DaemonSet"))["serviceAccountName"],
    }
    roles = {(m["kind"], m["metadata"]["name"]) for m in manifests if m["kind"].endswith("Role")}
    bound = set()
    for binding in (m for m in manifests if m["kind"].endswith("RoleBinding")):
        ref = binding["roleRef"]
        assert (ref["kind"], ref["name"]) in roles
        bound.add((ref["kind"], ref["name"]))
        component = binding["metadata"]["labels"]["app.kubernetes.io/component"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": accounts[component], "namespace": NAMESPACE}
        ]
    assert bound == roles


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_rbac_has_no_wildcards_and_no_cluster_wide_secret_access(
    helm: Helm, values: str | None
) -> None:
    for role in (m for m in helm.render(CHART, values) if m["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], role["metadata"]["name"]
            if "secrets" in rule["resources"] and role["kind"] == "ClusterRole":
                pytest.fail(f"ClusterRole {role['metadata']['name']} grants access to Secrets")


def test_the_provisioner_reads_exactly_the_secrets_the_storage_classes_name(helm: Helm) -> None:
    manifests = helm.render(CHART, "existing-secret-monitoring.yaml")
    granted = {}
    for role in manifests:
        if role["kind"] == "Role" and role["metadata"]["name"].endswith("-secrets"):
            (rule,) = role["rules"]
            assert rule["verbs"] == ["get"] and rule["resources"] == ["secrets"]
            granted[role["metadata"]["namespace"]] = set(rule["resourceNames"])
    named: dict[str, set[str]] = {}
    for storage_class in (m for m in manifests if m["kind"] == "StorageClass"):
        parameters = storage_class["parameters"]
        namespace = parameters["csi.storage.k8s.io/provisioner-secret-namespace"]
        named.setdefault(namespace, set()).add(
            parameters["csi.storage.k8s.io/provisioner-secret-name"]
        )
    assert (
        granted
        == named
        == {
            NAMESPACE: {"zerofs-credentials"},
            "storage-secrets": {"archive-credentials"},
        }
    )


# ------------------------------------------------------------------ the plugin's flags


def _plugin_config(manifests: list[Manifest], kind: str) -> tuple[Any, Manifest, Manifest]:
    """The chart's plugin container of ``kind``, its args parsed by the driver's CLI."""
    spec = _pod_spec(find(manifests, kind))
    plugin = container(spec, "zerofs-csi")
    env = {"KUBE_NODE_NAME": NODE, "POD_NAMESPACE": NAMESPACE, "POD_NAME": "zerofs-node-x"}
    fields = {
        item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"]
        for item in plugin["env"]
        if "fieldRef" in item.get("valueFrom", {})
    }
    # The downward API fields the plugin expects (owner.py: POD_NAME; cli.py: the rest).
    expected_fields = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    if kind == "DaemonSet":
        expected_fields["KUBE_NODE_NAME"] = "spec.nodeName"
    assert fields == expected_fields
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in plugin["args"]]
    return parse_config(args), spec, plugin


def _mount(spec: Manifest, plugin: Manifest, volume: str) -> tuple[Manifest, Manifest]:
    (mount,) = [m for m in plugin["volumeMounts"] if m["name"] == volume]
    (source,) = [v for v in spec["volumes"] if v["name"] == volume]
    return mount, source


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_controller_flags_parse_and_match_the_pod(helm: Helm, values: str | None) -> None:
    config, spec, plugin = _plugin_config(helm.render(CHART, values), "Deployment")
    assert config.role is Role.CONTROLLER
    assert config.backend is Backend.KUBERNETES
    assert config.driver_name == DRIVER_NAME
    assert config.namespace == NAMESPACE
    mount, source = _mount(spec, plugin, "socket-dir")
    assert config.endpoint.scheme == "unix"
    assert config.endpoint.address == f"{mount['mountPath']}/csi.sock"
    assert "emptyDir" in source
    for sidecar in ("csi-provisioner", "csi-attacher", "csi-resizer", "liveness-probe"):
        item = container(spec, sidecar)
        assert f"--csi-address={config.endpoint.address}" in item["args"]
        if sidecar != "liveness-probe":
            assert "--leader-election" in item["args"]
            assert "--leader-election-namespace=$(POD_NAMESPACE)" in item["args"]
    assert config.metrics_address == f":{port_number(plugin, 'metrics')}"
    assert plugin["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    health = port_number(plugin, "healthz")
    assert f"--http-endpoint=:{health}" in container(spec, "liveness-probe")["args"]


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=_ids)
def test_node_flags_parse_and_match_the_host_paths(helm: Helm, values: str | None) -> None:
    config, spec, plugin = _plugin_config(helm.render(CHART, values), "DaemonSet")
    assert config.role is Role.NODE
    assert config.backend is Backend.KUBERNETES
    assert config.node_id == NODE
    assert config.namespace == NAMESPACE
    assert plugin["securityContext"]["privileged"] is True

    # The state directory: the same path on the host and in the plugin, because the
    # per-volume pods get their socket directories (under it) by host path.
    mount, source = _mount(spec, plugin, "state-dir")
    assert mount["mountPath"] == source["hostPath"]["path"] == str(config.state_dir)

    # The kubelet directory, at its host path, with mounts propagating both ways.
    mount, source = _mount(spec, plugin, "kubelet-dir")
    assert mount["mountPropagation"] == "Bidirectional"
    kubelet_dir = source["hostPath"]["path"]
    assert mount["mountPath"] == kubelet_dir

    # The CSI socket: the kubelet finds it where the registrar says it is.
    mount, source = _mount(spec, plugin, "socket-dir")
    assert config.endpoint.address == f"{mount['mountPath']}/csi.sock"
    plugin_dir = f"{kubelet_dir}/plugins/{config.driver_name}"
    assert source["hostPath"]["path"] == plugin_dir
    registrar = container(spec, "node-driver-registrar")
    assert f"--kubelet-registration-path={plugin_dir}/csi.sock" in registrar["args"]
    (registration,) = [v for v in spec["volumes"] if v["name"] == "registration-dir"]
    assert registration["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"

    for volume, host_path in (("dev", "/dev"), ("sys", "/sys"), ("lib-modules", "/lib/modules")):
        mount, source = _mount(spec, plugin, volume)
        assert mount["mountPath"] == source["hostPath"]["path"] == host_path
    assert _mount(spec, plugin, "lib-modules")[0]["readOnly"] is True
    assert config.metrics_address == f":{port_number(plugin, 'metrics')}"


def test_default_node_plugin_loads_nbd_with_the_documented_parameters(helm: Helm) -> None:
    manifests = helm.render(CHART)
    spec = _pod_spec(find(manifests, "DaemonSet"))
    loader = container(spec, "load-nbd")
    script = loader["command"][-1]
    assert "modprobe nbd nbds_max=128 max_part=0" in script
    assert loader["securityContext"]["privileged"] is True
    assert loader["volumeMounts"] == [
        {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}
    ]
    config, _, _ = _plugin_config(manifests, "DaemonSet")
    assert config.max_volumes_per_node == 128


def test_nbd_loading_can_be_left_to_the_host(helm: Helm) -> None:
    spec = _pod_spec(find(helm.render(CHART, "local-k3s.yaml"), "DaemonSet"))
    assert [c["name"] for c in spec["initContainers"]] == [
        "link-keeper",
        "zerofs-csi",
        "liveness-probe",
    ]


def test_daemonset_selector_leaves_the_volume_server_pods_alone(helm: Helm) -> None:
    daemonset = find(helm.render(CHART), "DaemonSet")
    selector = daemonset["spec"]["selector"]
    assert objects.selector_matches(selector, daemonset["spec"]["template"]["metadata"]["labels"])
    server_labels = objects.volume_labels("pvc-0b6f4c1e-2f64-4bb1-9d4e-3b3a2a1f0e9d", NODE)
    assert not objects.selector_matches(selector, server_labels)


def test_defaults_use_the_system_priority_classes_and_a_disruption_budget(helm: Helm) -> None:
    manifests = helm.render(CHART)
    assert _pod_spec(find(manifests, "Deployment"))["priorityClassName"] == (
        "system-cluster-critical"
    )
    assert _pod_spec(find(manifests, "DaemonSet"))["priorityClassName"] == "system-node-critical"
    budget = find(manifests, "PodDisruptionBudget")
    deployment = find(manifests, "Deployment")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["replicas"] == 2


def test_images_are_pinned(helm: Helm) -> None:
    manifests = helm.render(CHART)
    for kind in ("Deployment", "DaemonSet"):
        spec = _pod_spec(find(manifests, kind))
        for item in all_containers(spec):
            image = item["image"]
            assert re.fullmatch(r"[a-z0-9./-]+:v?[0-9]+\.[0-9]+\.[0-9]+", image), image
    digest = helm.render(CHART, "existing-secret-monitoring.yaml")
    plugin = container(_pod_spec(find(digest, "DaemonSet")), "zerofs-csi")
    assert plugin["image"].endswith("@sha256:" + "0123456789abcdef" * 4)


def test_csidriver(helm: Helm) -> None:
    driver = find(helm.render(CHART), "CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    assert driver["spec"] == {
        "attachRequired": True,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
    }


def test_namespace_carries_the_privileged_pod_security_level(helm: Helm) -> None:
    namespace = find(helm.render(CHART, "local-k3s.yaml"), "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert not [m for m in helm.render(CHART) if m["kind"] == "Namespace"]


# ------------------------------------------------------------------ StorageClasses


@pytest.mark.parametrize("values", DRIVER_VALUES[1:], ids=_ids)
def test_storage_class_parameters_are_accepted_by_the_driver(
    helm: Helm, values: str | None
) -> None:
    classes = [m for m in helm.render(CHART, values) if m["kind"] == "StorageClass"]
    assert classes
    for storage_class in classes:
        assert storage_class["provisioner"] == DRIVER_NAME
        parameters = storage_class["parameters"]
        settings = parse_volume_settings(parameters)
        assert parameters["csi.storage.k8s.io/fstype"] == settings.filesystem
        for stage in ("provisioner", "node-stage"):
            assert parameters[f"csi.storage.k8s.io/{stage}-secret-name"]
            assert parameters[f"csi.storage.k8s.io/{stage}-secret-namespace"]
        driver_keys = {k for k in parameters if not k.startswith(RESERVED_PREFIXES)}
        assert driver_keys <= set(PARAMETER_KEYS)


def test_storage_class_fields_reach_the_parameters(helm: Helm) -> None:
    classes = {
        m["metadata"]["name"]: m
        for m in helm.render(CHART, "existing-secret-monitoring.yaml")
        if m["kind"] == "StorageClass"
    }
    fast = classes["zerofs-fast"]
    settings = parse_volume_settings(fast["parameters"])
    assert (settings.filesystem, settings.s3_allow_http, settings.delete_data_on_pvc_delete) == (
        "xfs",
        True,
        True,
    )
    assert settings.cache_disk_size_gb == 20.0
    default_class = {"storageclass.kubernetes.io/is-default-class": "true"}
    assert fast["metadata"]["annotations"] == default_class
    assert fast["mountOptions"] == ["noatime"]
    assert fast["volumeBindingMode"] == "WaitForFirstConsumer"
    archive = classes["zerofs-archive"]
    assert archive["reclaimPolicy"] == "Retain"
    assert archive["allowVolumeExpansion"] is False
    assert parse_volume_settings(archive["parameters"]).delete_data_on_pvc_delete is False


def test_schema_offers_exactly_the_driver_parameters() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    item = schema["properties"]["storageClasses"]["items"]
    extra = set(item["properties"]["parameters"]["propertyNames"]["enum"])
    first_class = {key for key in item["properties"] if key in PARAMETER_KEYS}
    assert first_class == {
        "storageUrl",
        "filesystem",
        "s3Endpoint",
        "s3Region",
        "s3AllowHttp",
        "deleteDataOnPVCDelete",
    }
    assert extra | first_class == set(PARAMETER_KEYS)
    assert not extra & first_class


def test_chart_secret_holds_the_csi_secret_keys(helm: Helm) -> None:
    manifests = helm.render(
        CHART,
        "minimal-s3.yaml",
        sets=["secret.awsSessionToken=token", "secret.conditionalPutUrl=redis://redis:6379"],
    )
    secret = find(manifests, "Secret")
    data = secret["stringData"]
    assert set(data) == CSI_SECRET_KEYS
    parsed = VolumeSecrets.from_csi_secrets(data)
    assert parsed.access_key_id == "AKIAEXAMPLEEXAMPLE00"
    (storage_class,) = [m for m in manifests if m["kind"] == "StorageClass"]
    assert (
        storage_class["parameters"]["csi.storage.k8s.io/node-stage-secret-name"]
        == (secret["metadata"]["name"])
    )


def test_existing_secret_means_no_chart_secret(helm: Helm) -> None:
    manifests = helm.render(CHART, "existing-secret-monitoring.yaml")
    assert not [m for m in manifests if m["kind"] == "Secret"]


# ------------------------------------------------------------------ metrics objects


def test_service_monitor_selects_the_metrics_services(helm: Helm) -> None:
    manifests = helm.render(CHART, "existing-secret-monitoring.yaml")
    monitor = find(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_API_VERSION
    services = [m for m in manifests if m["kind"] == "Service"]
    selected = [
        s
        for s in services
        if objects.selector_matches(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert len(selected) == 2
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    workloads = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m
        for m in manifests
        if m["kind"] in ("Deployment", "DaemonSet")
    }
    for service in selected:
        (port,) = service["spec"]["ports"]
        assert port["name"] == endpoint["port"]
        workload = workloads[service["metadata"]["labels"]["app.kubernetes.io/component"]]
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        service_selector = {"matchLabels": service["spec"]["selector"]}
        assert objects.selector_matches(service_selector, template_labels)
        plugin = container(_pod_spec(workload), "zerofs-csi")
        assert port_number(plugin, port["targetPort"]) == port["port"]


def test_prometheus_rule_and_dashboard_are_rendered_when_asked(helm: Helm) -> None:
    manifests = helm.render(CHART, "existing-secret-monitoring.yaml")
    rule = find(manifests, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "ZeroFSCSINBDLinkDead",
        "ZeroFSCSIStageFailures",
        "ZeroFSCSIForcedPodDeletions",
    } <= alerts
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            assert item["labels"]["severity"] in ("critical", "warning")
            assert item["annotations"]["summary"]
    dashboard = find(manifests, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["zerofs-csi.json"])["uid"] == "zerofs-csi"
    defaults = helm.render(CHART)
    assert not [m for m in defaults if m["apiVersion"] == CRD_API_VERSION]


# ------------------------------------------------------------------ validation chart


def test_validation_chart_writes_then_verifies_in_separate_test_pods(helm: Helm) -> None:
    manifests = helm.render(VALIDATION_CHART, "validation-soak.yaml")
    claim = find(manifests, "PersistentVolumeClaim", "-check")
    assert claim["spec"]["storageClassName"] == "zerofs-fast"
    pods = sorted(
        (m for m in manifests if m["kind"] == "Pod"),
        key=lambda pod: int(pod["metadata"]["annotations"]["helm.sh/hook-weight"]),
    )
    assert [p["spec"]["containers"][0]["name"] for p in pods] == ["write", "verify"]
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "data"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    job = find(manifests, "Job", "-soak")
    (fio,) = job["spec"]["template"]["spec"]["containers"]
    assert "fio /config/soak.fio" in fio["command"][-1]
    config = find(manifests, "ConfigMap", "-soak")["data"]["soak.fio"]
    assert "verify=crc32c" in config and "runtime=3600" in config
    soak_claim = find(manifests, "PersistentVolumeClaim", "-soak")
    assert soak_claim["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_validation_chart_has_no_soak_by_default(helm: Helm) -> None:
    manifests = helm.render(VALIDATION_CHART)
    assert not [m for m in manifests if m["kind"] == "Job"]
