"""Probes of the plugin pods: a slow start is not a hung plugin.

The liveness probes restart a plugin that stops answering; before a container first
answers, only a startup probe with a generous budget may judge it, so that a plugin
starting on a loaded node (the test cluster's TCG node took over two minutes) is not
killed in a loop before it ever serves.
"""

from __future__ import annotations

import pytest

from chart.conftest import CHART, DRIVER_VALUES, Helm, container, find, port_number

# The least time a container gets to answer its first probe.
STARTUP_BUDGET_S = 300
# The longest a serving container waits to count as started, and then as ready: each
# second of it delays a rollout of the DaemonSet on every node.
STARTUP_PERIOD_S = 2
READINESS_PERIOD_S = 5


def _budget(probe: dict[str, int]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )


def _sidecar(container: dict[str, object]) -> bool:
    """An init container that keeps running: the containers after it wait for it."""
    return container.get("restartPolicy") == "Always"


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_every_container_with_a_liveness_probe_gets_time_to_start(
    helm: Helm, values: str | None, kind: str
) -> None:
    spec = find(helm.render(CHART, values), kind)["spec"]["template"]["spec"]
    running = [c for c in spec.get("initContainers") or [] if _sidecar(c)] + spec["containers"]
    probed = [item for item in running if "livenessProbe" in item]
    assert probed, f"the {kind}'s containers have liveness probes"
    for item in probed:
        startup = item.get("startupProbe")
        assert startup, f"{kind} container {item['name']} has no startupProbe"
        assert _budget(startup) >= STARTUP_BUDGET_S, item["name"]
        assert startup.get("periodSeconds", 10) <= STARTUP_PERIOD_S, item["name"]
        readiness = item.get("readinessProbe")
        if readiness:
            assert readiness.get("periodSeconds", 10) <= READINESS_PERIOD_S, item["name"]
        if _sidecar(item):
            # The containers after it start once it answers: on its own endpoint (its
            # readiness), not one a later container serves, which would never start.
            assert readiness and startup["httpGet"] == readiness["httpGet"], item["name"]
        else:
            # The same endpoint: once it answers, the liveness probe takes over.
            assert startup["httpGet"] == item["livenessProbe"]["httpGet"], item["name"]


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_the_csi_sidecars_start_once_the_plugin_serves(
    helm: Helm, values: str | None, kind: str
) -> None:
    """The CSI sidecars exit when the plugin's socket does not answer within 30 s of
    their start (csi-lib-utils' connection timeout): they come after the plugin, a
    sidecar whose startup probe holds them back until it serves."""
    spec = find(helm.render(CHART, values), kind)["spec"]["template"]["spec"]
    (plugin,) = [c for c in spec.get("initContainers") or [] if c["name"] == "zerofs-csi"]
    assert _sidecar(plugin) and "startupProbe" in plugin
    csi_clients = [
        c["name"] for c in spec["containers"] if "--csi-address=/csi/csi.sock" in c.get("args", [])
    ]
    assert csi_clients and all(c["name"] != "zerofs-csi" for c in spec["containers"])


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_the_liveness_probe_waits_for_probe_as_long_as_the_kubelet_waits_for_it(
    helm: Helm, values: str | None, kind: str
) -> None:
    """The livenessprobe sidecar answers 500 when the plugin's Probe takes longer than
    its --probe-timeout (1 s by default): on a loaded node that restarted a healthy
    controller (the test cluster, twice in 27 minutes)."""
    spec = find(helm.render(CHART, values), kind)["spec"]["template"]["spec"]
    (plugin,) = [c for c in spec["initContainers"] if c["name"] == "zerofs-csi"]
    sidecar = container(spec, "liveness-probe")
    timeouts = [a.split("=", 1)[1] for a in sidecar["args"] if a.startswith("--probe-timeout=")]
    assert timeouts and timeouts[0].endswith("s"), sidecar["args"]
    assert float(timeouts[0][:-1]) >= plugin["livenessProbe"]["timeoutSeconds"]


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_the_plugins_liveness_probe_is_served_once_the_plugin_has_started(
    helm: Helm, values: str | None, kind: str
) -> None:
    """The plugin's liveness probe begins once its startup probe passes, and asks the
    livenessprobe sidecar's port: that sidecar must be the init sidecar right after the
    plugin, which starts then. As a regular container it started only after every init
    container and the containers before it: 4.5 minutes later on the test cluster's TCG
    node, by which time the kubelet had killed the plugin (failureThreshold 5 of 20 s)
    and did so in a loop."""
    spec = find(helm.render(CHART, values), kind)["spec"]["template"]["spec"]
    init = [c["name"] for c in spec["initContainers"]]
    plugin = container(spec, "zerofs-csi")
    port = plugin["livenessProbe"]["httpGet"]["port"]
    number = port_number(plugin, port)
    (server,) = [
        c for c in spec["initContainers"] if f"--http-endpoint=:{number}" in c.get("args", [])
    ]
    assert init.index(server["name"]) == init.index("zerofs-csi") + 1, init
    assert server.get("restartPolicy") == "Always"
