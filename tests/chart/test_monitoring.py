"""The PrometheusRule alerts and the Grafana dashboard query only series the driver
exports, with labels those series carry.

The exported series come from the driver itself: a plugin's registry built the way
server.build builds it, read through the client library. The queries are taken apart
with a small PromQL scanner (selectors, grouping clauses, functions), enough for the
expressions these files use; it is tested on its own below so that it cannot pass by
missing names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from chart.conftest import CHART, Helm, find
from zerofs_csi.observability.metrics import Metrics

# Series suffixes the client library adds per metric type (Prometheus exposition format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)")
# A number or duration (0.95, 5m, 1e3) is one token, so its letters are no identifier.
TOKEN = re.compile(r"(?P<number>[0-9][0-9A-Za-z_.]*)|(?P<identifier>[A-Za-z_:][A-Za-z0-9_:]*)")
LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)$")


@dataclass
class Query:
    metrics: set[str] = field(default_factory=set)
    matched_labels: dict[str, set[str]] = field(default_factory=dict)  # metric -> labels
    grouping_labels: set[str] = field(default_factory=set)


def scan(expr: str) -> Query:
    """The metric names, matcher labels and grouping labels of a PromQL expression."""
    query = Query()
    text = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery durations
    for match in GROUPING.finditer(text):
        query.grouping_labels |= {label.strip() for label in match.group(2).split(",") if label}
    text = GROUPING.sub(" ", text)

    def selector(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(2)
        labels = set(MATCHER.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)))
        names = {label for label, _ in labels}
        if name:
            query.matched_labels.setdefault(name, set()).update(names)
            return f" {name} "
        return " "

    text = SELECTOR.sub(selector, text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)  # string arguments
    for match in TOKEN.finditer(text):
        word = match.group("identifier")
        if word is None:
            continue
        following = text[match.end() :].lstrip()
        if word.lower() in KEYWORDS or following.startswith("("):
            continue  # an operator keyword, or a function or aggregation
        query.metrics.add(word)
    return query


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every series a plugin's registry can export."""
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    metrics = Metrics("node-a", registry)
    labels_of: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        describe = getattr(metric, "describe", None)
        if describe is None:
            continue
        for family in describe():
            labels_of[family.name] = set(getattr(metric, "_labelnames", ()))
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = labels_of.get(family.name, set())
        for sample in family.samples:
            labels |= set(sample.labels) - {"le", "quantile"}
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = labels | extra
    return series


def problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    query = scan(expr)
    found = []
    if not query.metrics:
        found.append(f"no metric in {expr!r}")
    for name in sorted(query.metrics):
        if name not in exported:
            found.append(f"{name} is not exported by the driver")
    for name, labels in query.matched_labels.items():
        for label in sorted(labels - exported.get(name, set())):
            found.append(f"{name} has no label {label!r}")
    available = set().union(*(exported.get(name, set()) for name in query.metrics))
    for label in sorted(query.grouping_labels - available):
        found.append(f"grouping by {label!r}, which none of {sorted(query.metrics)} carries")
    return found


def test_the_scanner_finds_what_is_wrong(exported: dict[str, set[str]]) -> None:
    assert problems("sum by (node) (rate(zerofs_csi_nope_total[5m]))", exported) == [
        "zerofs_csi_nope_total is not exported by the driver",
        "grouping by 'node', which none of ['zerofs_csi_nope_total'] carries",
    ]
    assert problems('zerofs_csi_nbd_dead_links{volume_id="x"} > 0', exported) == [
        "zerofs_csi_nbd_dead_links has no label 'volume_id'"
    ]
    assert problems("sum by (pod) (zerofs_csi_volumes_staged)", exported) == [
        "grouping by 'pod', which none of ['zerofs_csi_volumes_staged'] carries"
    ]
    # The counter is exported as <name>_total: its bare family name is no series.
    assert problems("rate(zerofs_csi_stage_failures[5m])", exported) == [
        "zerofs_csi_stage_failures is not exported by the driver"
    ]
    query = scan(
        "histogram_quantile(0.95, sum by (stage, le) (rate(zerofs_csi_stage_duration_seconds"
        '_bucket{node=~"$node", stage=~"mkfs|mount"}[5m]))) and on (node) '
        "zerofs_csi_volumes_staged offset 5m"
    )
    assert query.metrics == {
        "zerofs_csi_stage_duration_seconds_bucket",
        "zerofs_csi_volumes_staged",
    }
    assert query.matched_labels == {"zerofs_csi_stage_duration_seconds_bucket": {"node", "stage"}}
    assert query.grouping_labels == {"stage", "le", "node"}


def test_the_alerts_refer_to_exported_series(helm: Helm, exported: dict[str, set[str]]) -> None:
    manifests = helm.render(CHART, "existing-secret-monitoring.yaml")
    rule = find(manifests, "PrometheusRule")
    expressions = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    found = {alert: problems(expr, exported) for alert, expr in expressions.items()}
    assert {alert: p for alert, p in found.items() if p} == {}
    used = set().union(*(scan(expr).metrics for expr in expressions.values()))
    assert {
        "zerofs_csi_nbd_dead_links",
        "zerofs_csi_stage_failures_total",
        "zerofs_csi_forced_pod_deletions_total",
    } <= used


def _dashboard_queries(dashboard: dict[str, object]) -> list[str]:
    queries = []
    for panel in dashboard["panels"]:  # type: ignore[attr-defined]
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    return queries


def test_the_dashboard_refers_to_exported_series(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads((CHART / "dashboards" / "zerofs-csi.json").read_text())
    queries = _dashboard_queries(dashboard)
    assert len(queries) >= 10
    found = {expr: problems(expr, exported) for expr in queries}
    assert {expr: p for expr, p in found.items() if p} == {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["query"]["query"])
        assert match, variable["query"]
        metric, label = match.groups()
        assert label in exported.get(metric, set()), f"{metric} has no label {label}"


def test_the_dashboard_shows_every_driver_family() -> None:
    registry = CollectorRegistry()
    Metrics("node-a", registry)
    families = {
        family.name: {family.name + suffix for suffix in SUFFIXES[family.type]}
        for family in registry.collect()
    }
    assert families
    dashboard = json.loads((CHART / "dashboards" / "zerofs-csi.json").read_text())
    used = set().union(*(scan(expr).metrics for expr in _dashboard_queries(dashboard)))
    assert {name for name, series in families.items() if not series & used} == set()
