"""The metric names in docs/observability.md and the Grafana dashboard match what the registries define.

The operator's, gateway's and agent's registries are built and every series in them is touched once
(a labelled series exists only once used), so their names, types and labels are read from the
registries themselves: a metric added, renamed or relabelled without updating the docs fails here,
and so does a dashboard query of a metric no process exports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgefleet_agent.assignments import InstallResult
from edgefleet_agent.metrics import AgentMetrics, ServedModel
from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.edge_model import EdgeModelStatus
from edgefleet_operator.gateway.metrics import GatewayMetrics
from edgefleet_operator.metrics import OperatorMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "observability.md"
DASHBOARD = ROOT / "helm" / "edgefleet" / "dashboards" / "edgefleet.json"
METRIC = re.compile(r"\bedgefleet_(?:operator|gateway|agent)_[a-z0-9_]+\b")
ROW = re.compile(r"^\| `(?P<name>edgefleet_[a-z0-9_]+)` \| (?P<type>\w+) \| (?P<labels>[^|]*) \|")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


@dataclass(frozen=True)
class Family:
    """One metric as Prometheus sees it: the name it is documented by, its type, labels and sample names."""

    name: str
    """Counters with ``_total``; histograms and gauges as registered."""
    type: str
    labels: frozenset[str]
    samples: frozenset[str]


def operator_registry() -> CollectorRegistry:
    metrics = OperatorMetrics()
    metrics.reconciled("ok", 0.1)
    metrics.build_finished("ns", "model", "cpu", "built", 1.0)
    metrics.build_summary(
        {"candidates": [{"passes": [{"type": "GraphOptimization", "status": "applied", "seconds": 1}]}]}
    )
    metrics.jobs_running("ns", "model", ["cpu"])
    metrics.published("published", 0.1)
    metrics.store_error("publish")
    now = datetime.now(UTC)
    ready = Condition(type="Ready", status="True", reason="Ready", message="", last_transition_time=now)
    metrics.model_status("ns", "model", EdgeModelStatus(rollout_phase="Succeeded", conditions=[ready]))
    return metrics.registry


def gateway_registry() -> CollectorRegistry:
    metrics = GatewayMetrics(connected_devices=lambda: 3.0)
    metrics.rpc_latency.labels("/edgefleet.v1.FleetGateway/ReportHealth", "OK").observe(0.001)
    metrics.bytes_served.labels("target").inc(10)
    metrics.health_reports.inc()
    metrics.install_reports.labels("succeeded").inc()
    metrics.assignments_pushed.inc()
    metrics.enrollments.inc()
    metrics.renewals.inc()
    return metrics.registry


def agent_registry() -> CollectorRegistry:
    metrics = AgentMetrics()
    metrics.follow_models(lambda: [ServedModel("digits", "1.0.0", "a", "whole")])
    metrics.inference("digits", 0.002, fallback=True)
    metrics.inference_error("digits", "failed")
    metrics.fallback("digits", "tail", "CPUExecutionProvider")
    result = InstallResult(1, "ns", "digits", "", "1.0.0", "succeeded", "Installed", "", None, {"total": 1.0}, "a",
                           datetime.now(UTC))  # fmt: skip
    metrics.update(result)
    metrics.downloaded(100, delta=False)
    metrics.gateway_failure("watch")
    return metrics.registry


def families() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for registry in (operator_registry(), gateway_registry(), agent_registry()):
        for family in registry.collect():
            assert family.type in SUFFIXES, f"{family.name}: a {family.type}; docs and this test know {set(SUFFIXES)}"
            assert family.samples, f"{family.name} has no series: touch it in this test's *_registry()"
            name = family.name + "_total" if family.type == "counter" else family.name
            labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
            samples = frozenset(s.name for s in family.samples)
            assert all(s.startswith(family.name) for s in samples)
            found[name] = Family(name, family.type, labels, samples)
    return found


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """Metric name → (type, labels) from the tables in docs/observability.md."""
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        assert match["name"] not in rows, f"{match['name']} is documented twice"
        labels = frozenset(re.findall(r"`([a-z_]+)`", match["labels"]))
        rows[match["name"]] = (match["type"], labels)
    return rows


def test_the_docs_list_every_metric_with_its_type_and_labels() -> None:
    defined = families()
    rows = documented()
    assert {name for name in defined if name.startswith("edgefleet_operator_")}, "no operator metrics found"
    missing = sorted(set(defined) - set(rows))
    assert not missing, f"not documented in {DOCS.relative_to(ROOT)}: {missing}"
    unknown = sorted(set(rows) - set(defined))
    assert not unknown, f"documented but no registry defines them: {unknown}"
    for name, family in defined.items():
        assert rows[name] == (family.type, family.labels), f"{name}: documented {rows[name]}, defined {family}"
    # The example queries and alerts, too, name only metrics that exist.
    exported = {sample for family in defined.values() for sample in family.samples} | set(defined)
    mentioned = set(METRIC.findall(DOCS.read_text(encoding="utf-8")))
    assert not sorted(mentioned - exported), sorted(mentioned - exported)


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every panel, nested rows included."""
    panels: list[dict[str, Any]] = []
    for panel in node.get("panels", []):
        panels.append(panel)
        panels += _walk(panel)
    return panels


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _walk(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def test_every_metric_the_dashboard_queries_exists(dashboard: dict[str, Any]) -> None:
    exported = {sample for family in families().values() for sample in family.samples}
    used = {name for expr in _queries(dashboard) for name in METRIC.findall(expr)}
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics no registry exports: {unknown}"
    # What the issue asks the dashboard to show, from each of the three components.
    wanted = {
        "edgefleet_operator_reconciles_total",
        "edgefleet_operator_reconcile_duration_seconds_bucket",
        "edgefleet_operator_build_duration_seconds_bucket",
        "edgefleet_operator_pass_duration_seconds_sum",
        "edgefleet_operator_rollout_state",
        "edgefleet_gateway_connected_devices",
        "edgefleet_gateway_rpc_duration_seconds_bucket",
        "edgefleet_gateway_served_bytes_total",
        "edgefleet_agent_inference_duration_seconds_bucket",
        "edgefleet_agent_model_info",
        "edgefleet_agent_fallback_inferences_total",
        "edgefleet_agent_updates_total",
    }
    assert wanted <= used, sorted(wanted - used)


def test_the_dashboard_takes_its_data_source_from_a_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _walk(dashboard) if p["type"] != "row"]
    assert panels
    assert len({p["id"] for p in _walk(dashboard)}) == len(_walk(dashboard)), "panel ids repeat"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} queries nothing"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # No data source of a particular Grafana is baked in.
    assert '"uid": "prometheus"' not in DASHBOARD.read_text(encoding="utf-8")


def test_the_checks_above_catch_drift(dashboard: dict[str, Any]) -> None:
    """A metric missing from the docs, and a dashboard query of a metric that does not exist, are both seen."""
    exported = {sample for family in families().values() for sample in family.samples}
    assert "edgefleet_agent_inference_duration_seconds_bucket" in exported
    assert "edgefleet_agent_inference_duration_seconds" not in exported  # a histogram is queried by its suffixes
    assert METRIC.findall('rate(edgefleet_agent_updates_total{x="y"}[5m])') == ["edgefleet_agent_updates_total"]
    assert ROW.match("| `edgefleet_agent_model_info` | gauge | `model`, `version`, `slot` | ... |") is not None
