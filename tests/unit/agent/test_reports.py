"""The persistent install-report queue and the translations between plain values and fleet.proto."""

from __future__ import annotations

import errno
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgefleet_agent.assignments import AssignmentSpec, InstallResult
from edgefleet_agent.reports import ReportQueue, assignment_spec, install_report, model_health
from edgefleet_agent.runtime import ModelWindowStats
from edgefleet_proto.v1 import fleet_pb2

SHA = "ab" * 32
RESULT = InstallResult(
    revision=7,
    model_namespace="vision",
    model_name="digits",
    from_version="1.0.0",
    to_version="1.1.0",
    outcome="rolled_back",
    reason="SelfTestOutputs",
    message="output logits differs",
    failed_phase="self_test",
    durations={"download": 1.5, "self_test": 0.25, "total": 2.0},
    active_slot="a",
    finished_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
)


def test_reports_survive_a_new_queue_and_go_once_acknowledged(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path)
    later = replace(RESULT, revision=9, outcome="succeeded", reason="Installed", failed_phase=None)
    queue.put(later)
    path = queue.put(RESULT)
    assert path.name == "7-vision.digits.json"
    assert ReportQueue(tmp_path).pending() == [RESULT, later]  # a restart reads them back, oldest first
    queue.ack(RESULT)
    assert ReportQueue(tmp_path).pending() == [later]


def test_acknowledging_an_attempt_keeps_a_newer_report_for_the_same_revision(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path)
    queue.put(RESULT)
    retried = replace(RESULT, outcome="succeeded", reason="Installed", failed_phase=None)
    queue.put(retried)  # written while the first attempt's report was on its way
    queue.ack(RESULT)
    assert queue.pending() == [retried]
    queue.ack(retried)
    assert queue.pending() == []


def test_a_report_that_cannot_be_written_is_kept_in_memory_until_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the full-disk fault test: an install report that could not be written (ENOSPC)
    # raised out of the worker and took the whole agent, inference included, down.
    queue = ReportQueue(tmp_path)
    queue.put(RESULT)  # an older attempt, on disk

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("edgefleet_agent.reports.write_file_atomic", disk_full)
    retried = replace(RESULT, outcome="succeeded", reason="Installed", failed_phase=None)
    queue.put(retried)
    later = replace(retried, revision=8)
    queue.put(later)
    assert queue.pending() == [retried, later]  # the newer attempt, not the stale file
    queue.ack(RESULT)  # the stale attempt's acknowledgement does not drop the newer one
    assert queue.pending() == [retried, later]
    queue.ack(retried)
    queue.ack(later)
    assert queue.pending() == []
    assert not list((tmp_path / "reports").glob("*.json"))


def test_an_unreadable_report_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    queue = ReportQueue(tmp_path)
    queue.put(RESULT)
    (queue.directory / "3-x.y.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING):
        assert queue.pending() == [RESULT]
    assert (queue.directory / "3-x.y.bad").exists()
    assert "unreadable" in caplog.text


def test_an_install_result_becomes_an_install_report() -> None:
    report = install_report(RESULT)
    assert report.assignment_revision == 7
    assert (report.model_namespace, report.model_name, report.from_version, report.to_version) == (
        "vision",
        "digits",
        "1.0.0",
        "1.1.0",
    )
    assert report.outcome == fleet_pb2.INSTALL_OUTCOME_ROLLED_BACK
    assert report.failed_phase == fleet_pb2.INSTALL_PHASE_SELF_TEST
    assert report.active_slot == fleet_pb2.SLOT_A
    assert report.durations.download.ToTimedelta() == timedelta(seconds=1.5)
    assert report.durations.total.ToTimedelta() == timedelta(seconds=2)
    assert not report.durations.HasField("verify")
    assert report.finished_at.ToDatetime(tzinfo=UTC) == RESULT.finished_at


def test_reports_keep_to_the_wire_bounds() -> None:
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    long = replace(RESULT, reason="R" * 100, message="m" * 5000, failed_phase=None, active_slot=None, finished_at=local)
    report = install_report(long)
    assert (len(report.reason), len(report.message)) == (64, 1024)
    assert report.failed_phase == fleet_pb2.INSTALL_PHASE_UNSPECIFIED
    assert report.active_slot == fleet_pb2.SLOT_UNSPECIFIED
    assert report.finished_at.ToDatetime(tzinfo=UTC) == RESULT.finished_at


def test_a_model_window_becomes_model_health() -> None:
    stats = ModelWindowStats("vision", "digits", "1.0.0", "b", 10, 1, 1.0, 2.0, 3.0, 4)
    health = model_health(stats)
    assert (health.slot, health.inference_count, health.error_count, health.latency_p95_ms) == (
        fleet_pb2.SLOT_B,
        10,
        1,
        2.0,
    )
    assert model_health(replace(stats, slot=None)).slot == fleet_pb2.SLOT_UNSPECIFIED


def _assignment(**fields: object) -> fleet_pb2.Assignment:
    base: dict[str, object] = {
        "revision": 3,
        "model_namespace": "vision",
        "model_name": "digits",
        "version": "1.1.0",
        "action": fleet_pb2.ASSIGNMENT_ACTION_INSTALL,
        "target_paths": ["cpu-small/vision/digits/1.1.0/manifest.json"],
        "bundle_sha256": SHA,
        "bundle_length": 1234,
    }
    base.update(fields)
    return fleet_pb2.Assignment(**base)  # type: ignore[arg-type]


def test_a_valid_assignment_becomes_a_spec() -> None:
    assert assignment_spec(_assignment(delta_from_version="1.0.0")) == AssignmentSpec(
        revision=3,
        model_namespace="vision",
        model_name="digits",
        version="1.1.0",
        action="install",
        target_paths=("cpu-small/vision/digits/1.1.0/manifest.json",),
        bundle_sha256=SHA,
        bundle_length=1234,
        delta_from_version="1.0.0",
    )
    removal = assignment_spec(
        _assignment(action=fleet_pb2.ASSIGNMENT_ACTION_REMOVE, version="", target_paths=[], bundle_sha256="")
    )
    assert removal is not None
    assert removal.action == "remove"
    rollback = assignment_spec(
        _assignment(action=fleet_pb2.ASSIGNMENT_ACTION_ROLLBACK, target_paths=[], bundle_sha256="")
    )
    assert rollback is not None
    assert (rollback.action, rollback.delta_from_version) == ("rollback", None)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"action": fleet_pb2.ASSIGNMENT_ACTION_UNSPECIFIED}, "unknown action"),
        ({"action": 42}, "unknown action"),
        ({"revision": 0}, "revision"),
        ({"model_name": ""}, "model_name"),
        ({"model_namespace": "Not_A_Label"}, "model_namespace"),
        ({"version": ""}, "version"),
        ({"version": "../1"}, "version"),
        ({"target_paths": []}, "needs target paths"),
        ({"target_paths": ["../../etc/passwd"]}, "safe relative path"),
        ({"target_paths": ["a/" * 600 + "b"]}, "safe relative path"),
        ({"bundle_sha256": "AB" * 32}, "bundle_sha256"),
        ({"delta_from_version": "1 0"}, "delta_from_version"),
    ],
)
def test_a_malformed_assignment_is_skipped_with_a_log_line(
    fields: dict[str, object], problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert assignment_spec(_assignment(**fields)) is None
    assert problem in caplog.text


@pytest.mark.parametrize(
    ("name", "accepted"), [("digits", True), ("resnet.v2-int8", True), ("a..b", False), ("A", False)]
)
def test_model_names_are_dns_subdomains(name: str, accepted: bool) -> None:
    message = fleet_pb2.Assignment(
        revision=1,
        model_namespace="vision",
        model_name=name,
        version="1.0.0",
        action=fleet_pb2.ASSIGNMENT_ACTION_INSTALL,
        target_paths=[f"cpu-small/vision/{name}/1.0.0/manifest.json"],
        bundle_sha256="ab" * 32,
        bundle_length=1,
    )
    assert (assignment_spec(message) is not None) == accepted
