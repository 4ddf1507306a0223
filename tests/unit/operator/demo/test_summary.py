"""From observations to the record's rows: device states, class summaries, stage notes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edgefleet_core.resources.edge_model import LatencySummary, Variant, VariantPartition
from edgefleet_operator.demo.inference import VersionStats
from edgefleet_operator.demo.observe import DeviceView
from edgefleet_operator.demo.summary import (
    class_summary,
    describe_variant,
    device_row,
    device_state,
    percentile,
    stage_note,
)
from edgefleet_operator.fleet.records import AssignmentRecord, HealthAggregate, InstallRecord

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def _assignment(version: str, revision: int, action: str = "install") -> AssignmentRecord:
    return AssignmentRecord.model_validate(
        {
            "revision": revision,
            "model_namespace": "demo",
            "model_name": "digits",
            "version": version,
            "action": action,
            "target_paths": [f"edge-cpu/demo/digits/{version}/manifest.json"],
            "bundle_sha256": "a" * 64,
            "bundle_length": 10,
        }
    )


def _report(version: str, revision: int, outcome: str) -> InstallRecord:
    return InstallRecord.model_validate(
        {
            "revision": revision,
            "model_namespace": "demo",
            "model_name": "digits",
            "from_version": "",
            "to_version": version,
            "outcome": outcome,
            "reason": "Installed",
            "message": "",
            "failed_phase": None,
            "finished_at": NOW.isoformat(),
        }
    )


def _view(assignment: AssignmentRecord | None, *reports: InstallRecord) -> DeviceView:
    return DeviceView(assignment=assignment, installs={r.revision: r for r in reports})


@pytest.mark.parametrize(
    ("ready", "view", "serving", "state"),
    [
        (False, None, None, "starting"),
        (True, None, None, "enrolled"),
        (True, _view(None), None, "enrolled"),
        (True, _view(_assignment("1", 3)), None, "installing 1"),
        (True, _view(_assignment("1", 3), _report("1", 3, "succeeded")), None, "installed 1"),
        (True, _view(_assignment("1", 3), _report("1", 3, "succeeded")), "1", "serving"),
        (True, _view(_assignment("2", 5), _report("2", 5, "refused_verification")), "1", "refused 2"),
        (True, _view(_assignment("2", 5), _report("2", 5, "rolled_back")), "1", "rolled back from 2"),
        (True, _view(_assignment("2", 5), _report("2", 5, "failed")), "1", "install of 2 failed"),
        (True, _view(_assignment("1", 7, "rollback")), "2", "rolling back to 1"),
        (True, _view(_assignment("1", 7, "rollback"), _report("1", 7, "succeeded")), "1", "rolled back"),
    ],
)
def test_device_state(ready: bool, view: DeviceView | None, serving: str | None, state: str) -> None:
    assert device_state(ready, view, serving) == state


def test_the_report_for_a_version_is_its_latest() -> None:
    view = _view(
        _assignment("2", 9), _report("2", 5, "failed"), _report("2", 9, "succeeded"), _report("1", 2, "succeeded")
    )
    found = view.report_for("2")
    assert found is not None
    assert found.revision == 9
    assert view.report_for("3") is None


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 96.0


def test_a_row_counts_every_version_and_shows_the_latencies_of_the_one_served() -> None:
    stats = {"1": VersionStats(10, 1, 8, [1.0, 2.0]), "2": VersionStats(5, 5, 0, [])}
    row = device_row("edge-cpu-1", "edge-cpu", "serving", stats, "1")
    assert (row.requests, row.errors, row.correct, row.latencies_ms) == (15, 6, 8, (1.0, 2.0))
    assert device_row("x", "edge-cpu", "enrolled", {}, None).latencies_ms == ()


def _variant(partition: VariantPartition | None = None) -> Variant:
    return Variant(
        device_class="edge-npu",
        version="1",
        digest="sha256:" + "0" * 64,
        size_bytes=25_000,
        passes=["GraphOptimization", "QuantizeInt8"],
        latency_ms=LatencySummary(p50=0.02, p95=0.05),
        accuracy=0.99,
        accuracy_delta=-0.004,
        partition=partition,
    )


def test_a_class_summary_takes_the_variant_and_what_the_devices_served() -> None:
    partition = VariantPartition(cut=["relu.1"], head_execution_provider="CPUExecutionProvider")
    health = HealthAggregate(
        model_namespace="demo", model_name="digits", device_class="edge-npu", version="1", devices_reporting=2,
        inference_count=30, error_count=0, error_rate=0.0, p95_ms_max=1.0, p95_ms_median=1.0,
        accelerator_fallback_count=0, installs_succeeded=2, installs_failed=0, installs_rolled_back=0,
        installs_refused=0, devices_healthy=2,
    )  # fmt: skip
    served = [VersionStats(10, 0, 9, [1.0] * 10), VersionStats(10, 2, 8, [3.0] * 8)]
    summary = class_summary(_variant(partition), source_bytes=100_000, served=served, devices_total=3, health=health)
    assert summary.compression == 4.0
    assert summary.accuracy == 17 / 18  # right answers among those answered
    assert summary.baseline_accuracy == pytest.approx(0.994)
    assert summary.partition_cut == "relu.1"
    assert (summary.p50_ms, summary.p95_ms) == (1.0, 3.0)
    assert (summary.devices_healthy, summary.devices_total) == (2, 3)
    assert [c.chosen for c in summary.candidates] == [False, True]
    assert summary.candidates[1].latency_ms == 0.02
    unserved = class_summary(_variant(), source_bytes=100_000, served=[], devices_total=1, health=None)
    assert (unserved.accuracy, unserved.p50_ms, unserved.partition_cut, unserved.devices_healthy) == (
        0.99,
        None,
        None,
        0,
    )


def test_describe_variant_says_where_it_runs() -> None:
    assert "whole model on the CPU" in describe_variant(_variant())
    partition = VariantPartition(cut=["relu.1"], head_execution_provider="CPUExecutionProvider",
                                 tail_execution_provider="OpenVINOExecutionProvider")  # fmt: skip
    line = describe_variant(_variant(partition))
    assert "cut at relu.1: head on CPUExecutionProvider, tail on OpenVINOExecutionProvider" in line


def test_the_stage_note_averages_the_agents_timings() -> None:
    served = [VersionStats(4, 0, 4, [], {"head": 0.8, "tail": 0.4, "total": 2.0})]
    note = stage_note("edge-npu", served)
    expected = "per request: head 0.200 ms, tail 0.100 ms, total 0.500 ms"
    assert note == f"edge-npu: partitioned and pipelined; on the agents, {expected}"
    assert stage_note("edge-cpu", [VersionStats(2, 0, 2, [], {"run": 1.0})]) is not None
    assert "whole model" in (stage_note("edge-cpu", [VersionStats(2, 0, 2, [], {"run": 1.0})]) or "")
    assert stage_note("edge-cpu", [VersionStats(2, 2, 0, [])]) is None
