"""The health gate over the devices updated so far: pass, wait (and for what), fail (and why, in figures)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet_core.resources.edge_model import HealthGates
from edgefleet_operator.fleet import HealthAggregate
from edgefleet_operator.rollout import WaveEvidence, evaluate_gate

INSTALLED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AFTER_WINDOW = INSTALLED + timedelta(seconds=60)
GATES = HealthGates()  # errors ≤ 0.02, p95 ≤ 1.5x, healthy ≥ 0.9, installs ≥ 0.9, window 60 s, 3 reports


def _health(
    version: str, *, reporting: int = 5, inferences: int = 1000, errors: int = 0, p95: float = 5.0, healthy: int = 5
) -> HealthAggregate:
    return HealthAggregate(
        model_namespace="factory",
        model_name="digits",
        device_class="cpu-small",
        version=version,
        devices_reporting=reporting,
        inference_count=inferences,
        error_count=errors,
        error_rate=errors / inferences if inferences else 0.0,
        p95_ms_max=p95 * 1.2,
        p95_ms_median=p95,
        accelerator_fallback_count=0,
        installs_succeeded=reporting,
        installs_failed=0,
        installs_rolled_back=0,
        installs_refused=0,
        devices_healthy=healthy,
        healthy_ratio=healthy / reporting if reporting else 0.0,
    )


def _evidence(
    *,
    updated: int = 5,
    succeeded: int = 5,
    failed: int = 0,
    installed_at: datetime | None = INSTALLED,
    health: HealthAggregate | None = None,
    baseline: HealthAggregate | None = None,
) -> WaveEvidence:
    return WaveEvidence(
        version="2.0.0",
        updated=updated,
        installs_succeeded=succeeded,
        installs_failed=failed,
        installed_at=installed_at,
        health=_health("2.0.0") if health is None else health,
        baseline=_health("1.0.0", reporting=20, healthy=20) if baseline is None else baseline,
    )


def test_a_healthy_wave_passes_with_its_figures() -> None:
    result = evaluate_gate(GATES, _evidence(), AFTER_WINDOW)
    assert (result.verdict, result.reason, result.notes) == ("passed", "Healthy", ())
    assert result.message == (
        "5 of 5 install(s) succeeded; error rate 0.0000 (maximum 0.0200); 5 of 5 reporting device(s) healthy"
    )


def test_waits_for_install_reports_while_the_minimum_can_still_be_met() -> None:
    result = evaluate_gate(GATES, _evidence(updated=10, succeeded=8, failed=1), AFTER_WINDOW)
    assert (result.verdict, result.reason, result.until) == ("waiting", "AwaitingInstalls", None)
    assert "1 of 10 updated device(s) have not reported" in result.message
    # 9 of 10 succeeded meets 0.9 even with one still out: no need to wait for it.
    assert evaluate_gate(GATES, _evidence(updated=10, succeeded=9), AFTER_WINDOW).passed


def test_waits_out_the_observation_window_after_the_last_install() -> None:
    result = evaluate_gate(GATES, _evidence(), INSTALLED + timedelta(seconds=59))
    assert (result.verdict, result.reason) == ("waiting", "ObservationWindow")
    assert result.until == INSTALLED + timedelta(seconds=60)
    assert "observation window 60s" in result.message


def test_waits_for_enough_devices_to_report_health() -> None:
    result = evaluate_gate(GATES, _evidence(health=_health("2.0.0", reporting=2, healthy=2)), AFTER_WINDOW)
    assert (result.verdict, result.reason, result.until) == ("waiting", "AwaitingReports", None)
    assert result.message == "2 of 3 device(s) needed report health for 2.0.0"
    nobody = evaluate_gate(GATES, replace(_evidence(), health=None), AFTER_WINDOW)
    assert (nobody.reason, nobody.message) == ("AwaitingReports", "0 of 3 device(s) needed report health for 2.0.0")


def test_a_canary_smaller_than_min_reports_is_judged_on_what_it_has() -> None:
    one = _evidence(updated=1, succeeded=1, health=_health("2.0.0", reporting=1, healthy=1))
    result = evaluate_gate(GATES, one, AFTER_WINDOW)
    assert result.passed
    assert result.notes == ("minReports 3 lowered to 1: only 1 device(s) run 2.0.0",)


def test_installs_fail_as_soon_as_the_minimum_is_out_of_reach() -> None:
    # 7 succeeded, 2 failed, 1 still out: at best 8 of 10, under 0.9 — no window needed to know.
    result = evaluate_gate(GATES, _evidence(updated=10, succeeded=7, failed=2), INSTALLED)
    assert (result.verdict, result.reason) == ("failed", "InstallsFailed")
    assert result.message == ("installs failed on 2 of 10 updated device(s): success ratio at most 0.80, minimum 0.90")


def test_a_high_error_rate_fails_naming_the_figures() -> None:
    result = evaluate_gate(GATES, _evidence(health=_health("2.0.0", errors=50)), AFTER_WINDOW)
    assert (result.verdict, result.reason) == ("failed", "ErrorRateHigh")
    assert result.message == ("error rate 0.0500 (50 of 1000 inferences on 5 device(s)) is above the maximum 0.0200")


def test_a_p95_regression_against_the_previous_version_fails() -> None:
    result = evaluate_gate(GATES, _evidence(health=_health("2.0.0", p95=9.0)), AFTER_WINDOW)
    assert (result.verdict, result.reason) == ("failed", "LatencyRegressed")
    assert result.message == "p95 latency 9.00 ms is 1.80x the 5.00 ms of 1.0.0 (maximum 1.50x)"
    assert evaluate_gate(GATES, _evidence(health=_health("2.0.0", p95=7.5)), AFTER_WINDOW).passed  # 1.5x is allowed


def test_without_a_baseline_latency_is_not_compared_and_the_gate_says_so() -> None:
    first = replace(_evidence(health=_health("2.0.0", p95=900.0)), baseline=None)
    result = evaluate_gate(GATES, first, AFTER_WINDOW)
    assert result.passed
    assert result.notes == ("no p95 baseline for the previous version in this class: latency of 2.0.0 not compared",)


def test_too_few_healthy_devices_fail() -> None:
    result = evaluate_gate(GATES, _evidence(health=_health("2.0.0", healthy=3)), AFTER_WINDOW)
    assert (result.verdict, result.reason) == ("failed", "TooFewHealthy")
    assert result.message == (
        "3 of 5 reporting device(s) are healthy (ratio 0.60, minimum 0.90; "
        "healthy means an error rate of at most 0.0200)"
    )


def test_every_failing_check_is_named_and_the_first_is_the_reason() -> None:
    result = evaluate_gate(GATES, _evidence(health=_health("2.0.0", errors=100, p95=20.0, healthy=1)), AFTER_WINDOW)
    assert result.reason == "ErrorRateHigh"
    assert "error rate 0.1000" in result.message
    assert "p95 latency 20.00 ms is 4.00x" in result.message
    assert "1 of 5 reporting device(s) are healthy" in result.message


def test_with_no_minimum_success_ratio_a_wave_where_nothing_installed_passes_and_says_why() -> None:
    lenient = HealthGates(min_install_success_ratio=0)
    nothing_yet = _evidence(updated=2, succeeded=0, installed_at=None)
    assert evaluate_gate(lenient, nothing_yet, AFTER_WINDOW).reason == "AwaitingInstalls"
    all_failed = evaluate_gate(lenient, _evidence(updated=2, succeeded=0, failed=2), AFTER_WINDOW)
    assert (all_failed.verdict, all_failed.message) == ("passed", "0 of 2 install(s) succeeded")
    assert all_failed.notes[-1] == "no device runs 2.0.0: error rate, latency and healthy ratio not judged"


@pytest.mark.parametrize("updated", [0, -1])
def test_nothing_updated_is_waiting(updated: int) -> None:
    result = evaluate_gate(GATES, _evidence(updated=updated, succeeded=0), AFTER_WINDOW)
    assert (result.verdict, result.reason) == ("waiting", "AwaitingInstalls")
