"""The agent's metrics move when the agent works: real installs, a real self-test refusal, real inferences.

Against a real TUF repository (``bundle_world``) and ONNX Runtime; values are read back from the
agent's own registry, and once over HTTP as Prometheus scrapes them.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet_agent.cli import app
from edgefleet_agent.errors import InvalidTensors, UnknownModel
from edgefleet_agent.metrics import AgentMetrics, parse_listen
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_agent.updater import Updater
from edgefleet_core.bundle.selftest import make_self_test
from edgefleet_core.optimize.runtime import CPU_EP
from tests.unit.agent.bundle_world import MODEL, NAMESPACE, BundleWorld, model_bytes

INPUT = np.zeros((1, 1, 8, 8), np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> BundleWorld:
    """1.0.0; 2.0.0 with a delta from 1.0.0; 3.0.0 whose self-test holds 1.0.0's outputs (it must roll back)."""
    made = BundleWorld(tmp_path_factory.mktemp("world"))
    made.publish("1.0.0", {"model.onnx": model_bytes(0)})
    made.publish("2.0.0", {"model.onnx": model_bytes(1)}, base="1.0.0")
    made.publish("3.0.0", {"model.onnx": model_bytes(2)}, self_test=make_self_test({"model.onnx": model_bytes(0)}))
    return made


def value(metrics: AgentMetrics, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (yet)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def served_versions(metrics: AgentMetrics) -> list[tuple[str, str, str]]:
    """(model, version, slot) of every ``model_info`` series."""
    return sorted(
        (s.labels["model"], s.labels["version"], s.labels["slot"])
        for family in metrics.registry.collect()
        if family.name == "edgefleet_agent_model_info"
        for s in family.samples
        if s.value == 1.0
    )


def test_installs_rollbacks_and_inferences_move_the_agent_metrics(world: BundleWorld, tmp_path: Path) -> None:
    metrics = AgentMetrics()
    state = tmp_path / "state"
    updater = Updater(state, "cpu-small", ModelRuntime(metrics=metrics), lambda: world.client(state))
    assert served_versions(metrics) == []

    first = updater.apply(world.assignment("1.0.0", 1))
    assert (first.outcome, first.reason) == ("succeeded", "Installed")
    assert value(metrics, "edgefleet_agent_updates_total", outcome="succeeded", reason="Installed", stage="") == 1
    assert value(metrics, "edgefleet_agent_update_duration_seconds_count", outcome="succeeded") == 1
    full = value(metrics, "edgefleet_agent_download_bytes_total", encoding="full")
    assert full > 0
    assert served_versions(metrics) == [(MODEL, "1.0.0", "a")]
    assert value(metrics, "edgefleet_agent_partition_mode", model=MODEL, mode="whole") == 1
    assert value(metrics, "edgefleet_agent_partition_mode", model=MODEL, mode="split") == 0

    # A version whose self-test fails is rolled back; the reason and stage are on the counter.
    bad = updater.apply(world.assignment("3.0.0", 2))
    assert (bad.outcome, bad.reason, bad.failed_phase) == ("rolled_back", "SelfTestOutputs", "self_test")
    labels = {"outcome": "rolled_back", "reason": "SelfTestOutputs", "stage": "self_test"}
    assert value(metrics, "edgefleet_agent_updates_total", **labels) == 1
    assert served_versions(metrics) == [(MODEL, "1.0.0", "a")]  # it never served

    # A delta install: the delta bytes are counted apart, and the info names only the new version.
    second = updater.apply(world.assignment("2.0.0", 3))
    assert (second.outcome, second.reason) == ("succeeded", "Installed")
    assert value(metrics, "edgefleet_agent_download_bytes_total", encoding="delta") > 0
    assert served_versions(metrics) == [(MODEL, "2.0.0", "b")]

    runtime = updater.runtime
    for _ in range(3):
        assert runtime.predict(MODEL, {"input": INPUT}, namespace=NAMESPACE).version == "2.0.0"
    assert value(metrics, "edgefleet_agent_inference_requests_total", model=MODEL) == 3
    assert value(metrics, "edgefleet_agent_inference_duration_seconds_count", model=MODEL) == 3
    assert value(metrics, "edgefleet_agent_inference_duration_seconds_sum", model=MODEL) > 0
    # Buckets start below a millisecond: a tiny model's latency is resolved, not lumped into one bucket.
    bucket = "edgefleet_agent_inference_duration_seconds_bucket"
    assert metrics.registry.get_sample_value(bucket, {"model": MODEL, "le": "0.0005"}) is not None
    assert value(metrics, bucket, model=MODEL, le="2.5") == 3

    with pytest.raises(InvalidTensors):
        runtime.predict(MODEL, {"input": np.zeros((1, 2), np.float32)}, namespace=NAMESPACE)
    with pytest.raises(UnknownModel):
        runtime.predict("no-such-model", {"input": INPUT}, namespace=NAMESPACE)
    assert value(metrics, "edgefleet_agent_inference_errors_total", model=MODEL, kind="invalid_request") == 1
    # A name a client made up never becomes a label.
    assert value(metrics, "edgefleet_agent_inference_errors_total", model="", kind="unknown_model") == 1
    assert value(metrics, "edgefleet_agent_inference_requests_total", model="no-such-model") == 0
    assert value(metrics, "edgefleet_agent_inference_requests_total", model=MODEL) == 4

    removed = updater.apply(world.assignment("2.0.0", 4, action="remove"))
    assert removed.reason == "Removed"
    assert served_versions(metrics) == []


def test_a_stage_on_a_fallback_provider_counts_at_load_and_per_request() -> None:
    metrics = AgentMetrics()
    # The preferred provider is not in this ONNX Runtime: the session falls back to the CPU.
    runtime = ModelRuntime(("NoSuchExecutionProvider", CPU_EP), metrics=metrics)
    loaded = runtime.load(NAMESPACE, MODEL, "1.0.0", {"model.onnx": model_bytes(0)}, slot="a")
    assert loaded.degraded
    assert value(metrics, "edgefleet_agent_fallbacks_total", model=MODEL, stage="model", provider=CPU_EP) == 1
    runtime.activate(loaded)
    runtime.predict(MODEL, {"input": INPUT}, namespace=NAMESPACE)
    runtime.predict(MODEL, {"input": INPUT}, namespace=NAMESPACE)
    assert value(metrics, "edgefleet_agent_fallback_inferences_total", model=MODEL) == 2

    on_cpu = AgentMetrics()
    plain = ModelRuntime((CPU_EP,), metrics=on_cpu)
    plain.activate(plain.load(NAMESPACE, MODEL, "1.0.0", {"model.onnx": model_bytes(0)}, slot="a"))
    plain.predict(MODEL, {"input": INPUT}, namespace=NAMESPACE)
    assert value(on_cpu, "edgefleet_agent_fallback_inferences_total", model=MODEL) == 0
    assert value(on_cpu, "edgefleet_agent_fallbacks_total", model=MODEL, stage="model", provider=CPU_EP) == 0


def test_the_registry_is_served_over_http_and_is_the_agents_own() -> None:
    metrics = AgentMetrics()
    metrics.gateway_failure("health_report")
    server, thread, port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert 'edgefleet_agent_gateway_failures_total{call="health_report"} 1.0' in body
    assert "edgefleet_agent_inference_duration_seconds" in body
    # Nothing from the process-wide registry (its process and platform collectors) leaks in.
    assert "process_cpu_seconds_total" not in body
    assert value(AgentMetrics(), "edgefleet_agent_gateway_failures_total", call="health_report") == 0


@pytest.mark.parametrize("address", ["9092", ":9092", "host:", "host:99999", "host:port"])
def test_a_bad_listen_address_is_refused_naming_it(address: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen(address)


def test_a_listen_address_splits_into_host_and_port() -> None:
    assert parse_listen("0.0.0.0:9092") == ("0.0.0.0", 9092)
    assert parse_listen("[::1]:0") == ("::1", 0)


def test_agent_run_help_names_the_metrics_option_and_a_bad_address_is_refused(tmp_path: Path) -> None:
    shown = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "--metrics-listen" in shown.output
    args = ["run", "--state", str(tmp_path), "--gateway", "g:1", "--enroll-gateway", "g:2", "--gateway-ca",
            str(tmp_path / "ca.pem"), "--tuf-root", str(tmp_path / "root.json"), "--name", "dev"]  # fmt: skip
    refused = CliRunner().invoke(app, [*args, "--metrics-listen", "9092"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2
    assert "is not HOST:PORT" in refused.output
