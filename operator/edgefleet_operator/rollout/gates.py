"""The health gate a wave must pass before the next one starts.

Judged over every device updated so far (not only the last wave's), against the previous version in
the same class as the latency baseline. Pure: figures and a clock in, a verdict out.

Health is judged only once the observation window has passed and enough devices report, so a few
early windows do not decide a rollout; install failures are judged as soon as they make the
minimum success ratio unreachable, because no later report can undo them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from edgefleet_core.resources.base import duration_seconds
from edgefleet_core.resources.edge_model import HealthGates
from edgefleet_operator.fleet.records import HealthAggregate

GateVerdict = Literal["passed", "waiting", "failed"]
GateReason = Literal[
    "Healthy",
    "AwaitingInstalls",
    "ObservationWindow",
    "AwaitingReports",
    "InstallsFailed",
    "ErrorRateHigh",
    "LatencyRegressed",
    "TooFewHealthy",
]
"""Why a gate is where it is, as a Kubernetes condition reason (CamelCase)."""


@dataclass(frozen=True)
class WaveEvidence:
    """What the devices updated so far show about the new version."""

    version: str
    """The version being rolled out."""
    updated: int
    """Devices assigned the new version so far (every wave up to the current one)."""
    installs_succeeded: int
    """Of those, devices whose report on their assignment says it succeeded."""
    installs_failed: int
    """Of those, devices whose report says it failed, rolled back on the device, or was refused."""
    installed_at: datetime | None
    """When the last reported install finished (``None`` before any report): the window starts here."""
    health: HealthAggregate | None
    """The new version's health in the class (``None`` while no device reports it)."""
    baseline: HealthAggregate | None
    """The previous version's health in the class: the latency baseline (``None``: first rollout)."""

    @property
    def installs_pending(self) -> int:
        """Updated devices that have not reported on their assignment yet."""
        return max(0, self.updated - self.installs_succeeded - self.installs_failed)


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict, why, and the figures behind it in words."""

    verdict: GateVerdict
    reason: GateReason
    """The first check that decided the verdict."""
    message: str
    """For people: the figures and thresholds (every failing check when several fail)."""
    until: datetime | None = None
    """``waiting`` only: when time alone may change the verdict (``None``: when reports arrive)."""
    notes: tuple[str, ...] = ()
    """Checks skipped or relaxed, and why (no latency baseline; fewer devices than ``minReports``)."""

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"


def evaluate_gate(gates: HealthGates, evidence: WaveEvidence, now: datetime) -> GateResult:
    """Judge ``evidence`` against ``gates`` at ``now``."""
    if evidence.updated <= 0:
        return GateResult("waiting", "AwaitingInstalls", "no device has been assigned the new version yet")
    installs = _judge_installs(gates, evidence)
    if installs is not None:
        return installs
    if evidence.installed_at is None:  # only with a minimum success ratio of 0: still wait for one report
        return _awaiting_installs(gates, evidence)
    window_end = evidence.installed_at + timedelta(seconds=duration_seconds(gates.observation_window))
    if now < window_end:
        return GateResult(
            "waiting",
            "ObservationWindow",
            f"observing {evidence.version} until {window_end.isoformat()} "
            f"(observation window {gates.observation_window} after the last install)",
            until=window_end,
        )
    return _judge_reports(gates, evidence)


def _judge_reports(gates: HealthGates, evidence: WaveEvidence) -> GateResult:
    """``waiting`` until enough devices report health, then the health checks' verdict."""
    notes: list[str] = []
    # Devices whose install failed run the previous version and cannot report the new one: asking
    # for more reports than there are successful installs would stall a small wave forever.
    required = min(gates.min_reports, evidence.installs_succeeded)
    if required < gates.min_reports:
        notes.append(
            f"minReports {gates.min_reports} lowered to {required}: "
            f"only {evidence.installs_succeeded} device(s) run {evidence.version}"
        )
    reporting = evidence.health.devices_reporting if evidence.health is not None else 0
    if reporting < required:
        return GateResult(
            "waiting",
            "AwaitingReports",
            f"{reporting} of {required} device(s) needed report health for {evidence.version}",
            notes=tuple(notes),
        )
    if evidence.health is None or required == 0:
        # Only reachable with minInstallSuccessRatio 0 and no successful install: nothing runs the version.
        notes.append(f"no device runs {evidence.version}: error rate, latency and healthy ratio not judged")
        return GateResult("passed", "Healthy", _install_figures(evidence), notes=tuple(notes))
    return _judge_health(gates, evidence, evidence.health, notes)


def _judge_installs(gates: HealthGates, evidence: WaveEvidence) -> GateResult | None:
    """``failed`` when the success ratio can no longer be met, ``waiting`` until it is; ``None`` when met."""
    need = gates.min_install_success_ratio
    best_case = (evidence.installs_succeeded + evidence.installs_pending) / evidence.updated
    if best_case < need:
        return GateResult(
            "failed",
            "InstallsFailed",
            f"installs failed on {evidence.installs_failed} of {evidence.updated} updated device(s): "
            f"success ratio at most {best_case:.2f}, minimum {need:.2f}",
        )
    if evidence.installs_succeeded / evidence.updated < need:
        return _awaiting_installs(gates, evidence)
    return None


def _awaiting_installs(gates: HealthGates, evidence: WaveEvidence) -> GateResult:
    return GateResult(
        "waiting",
        "AwaitingInstalls",
        f"{evidence.installs_pending} of {evidence.updated} updated device(s) have not reported their install "
        f"({evidence.installs_succeeded} succeeded, {evidence.installs_failed} failed; minimum success ratio "
        f"{gates.min_install_success_ratio:.2f})",
    )


def _judge_health(gates: HealthGates, evidence: WaveEvidence, health: HealthAggregate, notes: list[str]) -> GateResult:
    failures: list[tuple[GateReason, str]] = []
    if health.error_rate > gates.max_error_rate:
        failures.append(
            (
                "ErrorRateHigh",
                f"error rate {health.error_rate:.4f} ({health.error_count} of {health.inference_count} inferences "
                f"on {health.devices_reporting} device(s)) is above the maximum {gates.max_error_rate:.4f}",
            )
        )
    latency = _judge_latency(gates, evidence, health, notes)
    if latency is not None:
        failures.append(("LatencyRegressed", latency))
    if health.healthy_ratio < gates.min_healthy_ratio:
        failures.append(
            (
                "TooFewHealthy",
                f"{health.devices_healthy} of {health.devices_reporting} reporting device(s) are healthy "
                f"(ratio {health.healthy_ratio:.2f}, minimum {gates.min_healthy_ratio:.2f}; healthy means an "
                f"error rate of at most {gates.max_error_rate:.4f})",
            )
        )
    if failures:
        return GateResult("failed", failures[0][0], "; ".join(text for _, text in failures), notes=tuple(notes))
    figures = (
        f"{_install_figures(evidence)}; error rate {health.error_rate:.4f} (maximum {gates.max_error_rate:.4f}); "
        f"{health.devices_healthy} of {health.devices_reporting} reporting device(s) healthy"
    )
    return GateResult("passed", "Healthy", figures, notes=tuple(notes))


def _judge_latency(gates: HealthGates, evidence: WaveEvidence, health: HealthAggregate, notes: list[str]) -> str | None:
    """The failure message when p95 regressed; ``None`` when it did not or cannot be compared (noted why)."""
    baseline = evidence.baseline
    # Medians of the devices' p95s on both sides: one slow device should not decide, and the new
    # version runs on a few canaries while the baseline runs on the rest of the class.
    if baseline is None or baseline.p95_ms_median <= 0:
        notes.append(
            f"no p95 baseline for the previous version in this class: latency of {evidence.version} not compared"
        )
        return None
    if health.p95_ms_median <= 0:
        notes.append(f"no device served {evidence.version} yet: latency not compared")
        return None
    ratio = health.p95_ms_median / baseline.p95_ms_median
    if ratio <= gates.max_p95_latency_ratio:
        return None
    return (
        f"p95 latency {health.p95_ms_median:.2f} ms is {ratio:.2f}x the {baseline.p95_ms_median:.2f} ms of "
        f"{baseline.version} (maximum {gates.max_p95_latency_ratio:.2f}x)"
    )


def _install_figures(evidence: WaveEvidence) -> str:
    return f"{evidence.installs_succeeded} of {evidence.updated} install(s) succeeded"
