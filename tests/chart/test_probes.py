"""Probes of the plugin pods: a slow start is not a hung plugin.

The liveness probes restart a plugin that stops answering; before a container first
answers, only a startup probe with a generous budget may judge it, so that a plugin
starting on a loaded node (the test cluster's TCG node took over two minutes) is not
killed in a loop before it ever serves.
"""

from __future__ import annotations

import pytest

from chart.conftest import CHART, DRIVER_VALUES, Helm, find

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


@pytest.mark.parametrize("values", DRIVER_VALUES, ids=lambda v: v or "defaults")
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_every_container_with_a_liveness_probe_gets_time_to_start(
    helm: Helm, values: str | None, kind: str
) -> None:
    spec = find(helm.render(CHART, values), kind)["spec"]["template"]["spec"]
    probed = [item for item in spec["containers"] if "livenessProbe" in item]
    assert probed, f"the {kind}'s containers have liveness probes"
    for container in probed:
        startup = container.get("startupProbe")
        assert startup, f"{kind} container {container['name']} has no startupProbe"
        assert _budget(startup) >= STARTUP_BUDGET_S, container["name"]
        # The same endpoint: once it answers, the liveness probe takes over.
        assert startup["httpGet"] == container["livenessProbe"]["httpGet"], container["name"]
        assert startup.get("periodSeconds", 10) <= STARTUP_PERIOD_S, container["name"]
        readiness = container.get("readinessProbe")
        if readiness:
            assert readiness.get("periodSeconds", 10) <= READINESS_PERIOD_S, container["name"]
