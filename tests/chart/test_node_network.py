"""The node plugin's pod network: the host's, since the kernel's ``nbd`` generic netlink
family (and its LINK_DEAD multicasts) exist in the initial network namespace only."""

from __future__ import annotations

import pytest

from chart.conftest import CHART, DRIVER_VALUES, Helm, Manifest, all_containers, find

# Ports a node's own components listen on (kubelet, kube-proxy, the control plane's
# components on control-plane nodes) and ports other host-network agents commonly take
# (node-exporter 9100; 8080, the usual first choice of everything).
HOST_PORTS_TAKEN = {8080, 9100, 10248, 10249, 10250, 10255, 10256, 10257, 10259, 2379, 2380}


def _pod_spec(manifests: list[Manifest], kind: str) -> Manifest:
    return dict(find(manifests, kind)["spec"]["template"]["spec"])


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
def test_node_plugin_runs_in_the_host_network_namespace(helm: Helm, values: str | None) -> None:
    manifests = helm.render(CHART, values)
    node = _pod_spec(manifests, "DaemonSet")
    assert node.get("hostNetwork") is True
    # Cluster DNS still answers the plugin (the API server's Service name, S3 endpoints).
    assert node.get("dnsPolicy") == "ClusterFirstWithHostNet"
    # The controller needs no netlink: it keeps its own network namespace.
    assert not _pod_spec(manifests, "Deployment").get("hostNetwork")


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
def test_node_plugin_ports_are_host_ports_that_are_free_on_a_node(
    helm: Helm, values: str | None
) -> None:
    node = _pod_spec(helm.render(CHART, values), "DaemonSet")
    ports = [
        port["containerPort"] for item in all_containers(node) for port in item.get("ports") or []
    ]
    assert ports, "the node plugin's containers declare their ports"
    # On the host network every container port is a port of the node.
    assert len(ports) == len(set(ports)), ports
    assert not set(ports) & HOST_PORTS_TAKEN, sorted(set(ports) & HOST_PORTS_TAKEN)
