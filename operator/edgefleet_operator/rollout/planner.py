"""The rollout of one model in one device class, one decision at a time.

:func:`plan_step` is pure: the status written last time, the target, a snapshot of the class and
the time in; one decision out. Everything it needs to remember between steps is in the
:class:`~edgefleet_core.resources.edge_model.ClassRollout` status (version, rollback target, phase,
wave, ``lastTransitionTime``) or in the fleet itself (who holds which assignment, their install
reports and health), so a restarted operator carries on where the last one stopped.

``wave`` is the wave in progress: it becomes current when the wave before passes its gate
(``lastTransitionTime`` is then that moment), and its devices are assigned once the pause after the
previous wave has run from there. ``lastTransitionTime`` moves whenever phase, wave or version does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from edgefleet_core.resources.base import duration_seconds
from edgefleet_core.resources.edge_model import ClassRollout, RolloutPhase
from edgefleet_operator.fleet.records import WaveRef
from edgefleet_operator.rollout.decisions import (
    AdvanceWave,
    AssignWave,
    ClassSnapshot,
    Complete,
    DeviceState,
    Halt,
    Hold,
    Resume,
    RollBack,
    RolloutAction,
    RolloutDecision,
    RolloutTarget,
    StartRollout,
    Wait,
)
from edgefleet_operator.rollout.errors import RolloutInputError
from edgefleet_operator.rollout.gates import GateResult, WaveEvidence, evaluate_gate
from edgefleet_operator.rollout.waves import WavePlan, plan_waves


def plan_step(
    rollout: ClassRollout | None, target: RolloutTarget, snapshot: ClassSnapshot, now: datetime
) -> RolloutDecision:
    """The next thing to do for ``target``'s rollout, given the status written last (``None``: none yet).

    Apply the decision's action, write its status, and call again until the action is a
    :class:`~edgefleet_operator.rollout.decisions.Wait`.
    """
    if now.tzinfo is None:
        raise RolloutInputError("the rollout clock returned a naive datetime; it must be timezone-aware")
    if rollout is not None and rollout.device_class != target.device_class:
        raise RolloutInputError(f"status of class {rollout.device_class} passed for class {target.device_class}")
    step = _Step(rollout, target, snapshot, now)
    if rollout is None or rollout.version != target.version:
        return step.start()
    return step.carry_on(rollout)


def rollback_target(rollout: ClassRollout | None, target: RolloutTarget, snapshot: ClassSnapshot) -> str | None:
    """The version to roll back to when ``target``'s rollout starts: the last one fully rolled out.

    A new spec mid-rollout keeps the rollback target of the rollout it replaces: the version it was
    rolling out never proved itself. Without a status (a first rollout, or status lost) the fleet
    decides: the version held by every device that does not hold the target, if there is one.
    """
    if rollout is not None and rollout.version is not None:
        previous = rollout.version if rollout.phase == "Succeeded" else rollout.previous_version
    else:
        held = {
            d.assignment.version
            for d in snapshot.devices
            if d.assignment is not None and d.assignment.action != "remove" and not d.holds(target.version)
        }
        previous = held.pop() if len(held) == 1 else None
    # Rolling back to the version being rolled out would be no rollback at all.
    return None if previous == target.version else previous


@dataclass
class _Step:
    """One call of :func:`plan_step`: its inputs and what is derived from them, computed once."""

    rollout: ClassRollout | None
    target: RolloutTarget
    snapshot: ClassSnapshot
    now: datetime

    # ---------------------------------------------------------------------------------- derived

    @cached_property
    def plan(self) -> WavePlan:
        return plan_waves(
            self.target.model_namespace,
            self.target.model_name,
            (d.name for d in self.snapshot.devices),
            [w.percent for w in self.target.policy.waves],
        )

    @cached_property
    def updated(self) -> tuple[DeviceState, ...]:
        """Devices assigned the target version, by name."""
        return tuple(d for d in self.snapshot.devices if d.holds(self.target.version))

    @cached_property
    def updated_names(self) -> frozenset[str]:
        return frozenset(d.name for d in self.updated)

    def wave(self, rollout: ClassRollout) -> int:
        # The policy may have lost waves since the status was written.
        return min(max(rollout.wave or 1, 1), self.plan.waves)

    def pause_before(self, wave: int) -> timedelta:
        """The pause after the wave before ``wave`` (none before the first)."""
        if wave <= 1:
            return timedelta(0)
        return timedelta(seconds=duration_seconds(self.target.policy.waves[wave - 2].pause))

    def evidence(self, not_before: datetime | None) -> WaveEvidence:
        """What the updated devices show; install times before ``not_before`` count as ``not_before``.

        Devices stamp their own reports: a device whose clock lags must not end the observation window
        before its wave was even assigned, so callers pass the moment the wave became current.
        """
        reports = [d.report for d in self.updated if d.report is not None]
        finished = max((r.finished_at for r in reports), default=None)
        if finished is not None and not_before is not None:
            finished = max(finished, not_before)
        succeeded = sum(1 for r in reports if r.outcome == "succeeded")
        return WaveEvidence(
            version=self.target.version,
            updated=len(self.updated),
            installs_succeeded=succeeded,
            installs_failed=len(reports) - succeeded,
            installed_at=finished,
            health=self.snapshot.health_of(self.target.version),
            baseline=self.snapshot.health_of(self.rollout.previous_version if self.rollout else None),
        )

    def rollback_devices(self, previous: str) -> tuple[str, ...]:
        """Devices assigned to install any version but ``previous``: this rollout's, and a replaced one's."""
        return tuple(
            d.name
            for d in self.snapshot.devices
            if d.assignment is not None and d.assignment.action == "install" and d.assignment.version != previous
        )

    def rolled_back_count(self, previous: str | None) -> int:
        return sum(
            1
            for d in self.snapshot.devices
            if d.assignment is not None and d.assignment.action == "rollback" and d.assignment.version == previous
        )

    # ---------------------------------------------------------------------------------- status

    def status(
        self,
        before: ClassRollout | None,
        phase: RolloutPhase,
        wave: int,
        message: str,
        *,
        previous: str | None,
        newly_updated: int = 0,
        frozen: bool = False,
        rolled_back: int = 0,
    ) -> ClassRollout:
        """The status after this step. ``frozen``: keep the counts of ``before`` (a failed rollout's)."""
        since = self.now
        if before is not None and before.last_transition_time is not None:
            unmoved = (before.phase, before.wave, before.version) == (phase, wave, self.target.version)
            since = before.last_transition_time if unmoved else self.now
        if frozen and before is not None:
            updated, healthy, failed = before.updated or 0, before.healthy or 0, before.failed or 0
        else:
            health = self.snapshot.health_of(self.target.version)
            updated = len(self.updated) + newly_updated
            healthy = health.devices_healthy if health is not None else 0
            failed = sum(1 for d in self.updated if d.report is not None and d.report.outcome != "succeeded")
        return ClassRollout(
            device_class=self.target.device_class,
            version=self.target.version,
            previous_version=previous,
            phase=phase,
            wave=wave,
            waves=self.plan.waves,
            devices=len(self.snapshot.devices),
            updated=updated,
            healthy=healthy,
            failed=failed,
            rolled_back=rolled_back,
            last_transition_time=since,
            message=message,
        )

    def decide(
        self,
        action: RolloutAction,
        before: ClassRollout,
        phase: RolloutPhase,
        message: str,
        reason: str,
        *,
        newly_updated: int = 0,
    ) -> RolloutDecision:
        status = self.status(
            before, phase, self.wave(before), message, previous=before.previous_version, newly_updated=newly_updated
        )
        return RolloutDecision(action, status, reason)

    def wait(
        self, before: ClassRollout, phase: RolloutPhase, until: datetime | None, message: str, reason: str
    ) -> RolloutDecision:
        # A failed rollout keeps the figures it failed with; they are what the message explains.
        frozen = phase in ("Failed", "RolledBack")
        rolled_back = self.rolled_back_count(before.previous_version) if phase == "RolledBack" else 0
        status = self.status(
            before,
            phase,
            self.wave(before),
            message,
            previous=before.previous_version,
            frozen=frozen,
            rolled_back=rolled_back,
        )
        return RolloutDecision(Wait(until), status, reason)

    # ---------------------------------------------------------------------------------- phases

    def start(self) -> RolloutDecision:
        previous = rollback_target(self.rollout, self.target, self.snapshot)
        old = self.rollout
        # Only a rollout still under way is replaced; after one that ended, this is simply the next rollout.
        under_way = old is not None and old.phase in ("Pending", "Progressing", "Paused")
        replaced = old.version if old is not None and under_way and old.version != self.target.version else None
        back = f"rollback target {previous}" if previous else "no previous version to roll back to"
        if replaced is not None and old is not None:
            message = (
                f"rolling out {self.target.version} from wave 1, replacing the rollout of {replaced} "
                f"({old.phase} at wave {old.wave or 0}); {back}"
            )
        else:
            message = f"rolling out {self.target.version} in {self.plan.waves} wave(s); {back}"
        status = self.status(old, "Progressing", 1, message, previous=previous)
        reason = "RolloutRestarted" if replaced else "RolloutStarted"
        return RolloutDecision(StartRollout(previous, replaced), status, reason)

    def carry_on(self, rollout: ClassRollout) -> RolloutDecision:
        """The next step of the rollout ``rollout`` describes (of the target's version)."""
        by_phase = {
            "Pending": self.keep_progressing,
            "Progressing": self.keep_progressing,
            "Paused": self.keep_paused,
            "Succeeded": self.keep_succeeded,
            "RolledBack": self.keep_rolled_back,
            "Failed": self.keep_failed,
        }
        return by_phase[rollout.phase](rollout)

    def keep_paused(self, rollout: ClassRollout) -> RolloutDecision:
        if self.target.paused:
            return self.wait(rollout, "Paused", None, rollout.message or "", "RolloutPaused")
        return self.decide(Resume(), rollout, "Progressing", f"resumed at wave {self.wave(rollout)}", "RolloutResumed")

    def keep_failed(self, rollout: ClassRollout) -> RolloutDecision:
        return self.wait(rollout, "Failed", None, rollout.message or "", "RolloutFailed")

    def keep_progressing(self, rollout: ClassRollout) -> RolloutDecision:
        if self.target.paused:
            message = f"paused at wave {self.wave(rollout)} of {self.plan.waves} (spec.paused)"
            return self.decide(Hold(), rollout, "Paused", message, "RolloutPaused")
        if not self.snapshot.devices:
            message = f"no devices of class {self.target.device_class} in namespace {self.target.model_namespace} yet"
            return self.wait(rollout, "Pending", None, message, "NoDevices")
        return self.progress(rollout)

    def progress(self, rollout: ClassRollout) -> RolloutDecision:
        wave = self.wave(rollout)
        became_current = rollout.last_transition_time or self.now
        missing = tuple(name for name in self.plan.members(wave) if name not in self.updated_names)
        if missing:
            return self.assign_when_due(rollout, wave, missing, became_current + self.pause_before(wave))
        gate = evaluate_gate(self.target.policy.health_gates, self.evidence(not_before=became_current), self.now)
        where = f"wave {wave} of {self.plan.waves}"
        if gate.failed:
            return self.fail(rollout, wave, gate)
        if not gate.passed:
            return self.wait(rollout, "Progressing", gate.until, f"{where}: {gate.message}", gate.reason)
        following = self.plan.next_wave_with_devices(wave)
        if following is None:
            message = f"all {self.plan.waves} wave(s) healthy: {gate.message}"
            status = self.status(rollout, "Succeeded", self.plan.waves, message, previous=rollout.previous_version)
            return RolloutDecision(Complete(gate), status, "RolloutSucceeded")
        starts_at = self.now + self.pause_before(following)
        message = f"{where} healthy ({gate.message}); wave {following} starts at {starts_at.isoformat()}"
        status = self.status(rollout, "Progressing", following, message, previous=rollout.previous_version)
        return RolloutDecision(AdvanceWave(wave, following, starts_at, gate), status, "WaveHealthy")

    def assign_when_due(
        self, rollout: ClassRollout, wave: int, missing: tuple[str, ...], starts_at: datetime
    ) -> RolloutDecision:
        if self.updated:
            # The devices already updated keep being judged while the next wave waits out its pause.
            gate = evaluate_gate(self.target.policy.health_gates, self.evidence(not_before=None), self.now)
            if gate.failed:
                return self.fail(rollout, wave, gate)
        if self.now < starts_at:
            message = f"wave {wave} of {self.plan.waves} ({len(missing)} device(s)) starts at {starts_at.isoformat()}"
            return self.wait(rollout, "Progressing", starts_at, message, "WavePause")
        percent = self.target.policy.waves[wave - 1].percent
        ref = WaveRef(index=wave - 1, count=self.plan.waves, percent=percent)
        message = f"wave {wave} of {self.plan.waves} ({percent} %): {self.target.version} to {len(missing)} device(s)"
        return self.decide(
            AssignWave(wave, ref, self.target.version, missing),
            rollout,
            "Progressing",
            message,
            "WaveAssigned",
            newly_updated=len(missing),
        )

    def fail(self, rollout: ClassRollout, wave: int, gate: GateResult) -> RolloutDecision:
        previous = rollout.previous_version
        failed = f"wave {wave} of {self.plan.waves} failed its health gate ({gate.reason}): {gate.message}"
        if previous is not None and self.target.policy.auto_rollback:
            devices = self.rollback_devices(previous)
            message = f"{failed}; rolled back {len(devices)} device(s) to {previous}"
            status = self.status(rollout, "RolledBack", wave, message, previous=previous, rolled_back=len(devices))
            return RolloutDecision(RollBack(previous, devices, gate), status, gate.reason)
        why = "autoRollback is off" if previous is not None else "there is no previous version in this class"
        status = self.status(rollout, "Failed", wave, f"{failed}; not rolled back: {why}", previous=previous)
        return RolloutDecision(Halt(gate), status, gate.reason)

    def keep_rolled_back(self, rollout: ClassRollout) -> RolloutDecision:
        previous = rollout.previous_version
        devices = self.rollback_devices(previous) if previous is not None and not self.target.paused else ()
        if previous is None or not devices:
            return self.wait(rollout, "RolledBack", None, rollout.message or "", "RolledBack")
        # A rollback decided earlier did not reach these devices (an interrupted step): send them back too.
        rolled_back = self.rolled_back_count(previous) + len(devices)
        message = rollout.message or ""
        status = self.status(
            rollout, "RolledBack", self.wave(rollout), message, previous=previous, frozen=True, rolled_back=rolled_back
        )
        return RolloutDecision(RollBack(previous, devices, None), status, "RolledBack")

    def keep_succeeded(self, rollout: ClassRollout) -> RolloutDecision:
        late = tuple(name for name in self.plan.order if name not in self.updated_names)
        if not late or self.target.paused:
            return self.wait(rollout, "Succeeded", None, rollout.message or "", "RolloutSucceeded")
        # Devices that enrolled after the rollout finished get the version every other device runs.
        waves = self.plan.waves
        ref = WaveRef(index=waves - 1, count=waves, percent=self.target.policy.waves[-1].percent)
        message = f"{self.target.version} assigned to {len(late)} device(s) that joined the class after the rollout"
        return self.decide(
            AssignWave(waves, ref, self.target.version, late),
            rollout,
            "Succeeded",
            message,
            "DevicesCaughtUp",
            newly_updated=len(late),
        )
