"""What the planner reads (a target and a snapshot of one class) and what it decides.

Plain frozen values, so a decision can be logged, compared in tests, and applied by any executor
(:class:`~edgefleet_operator.rollout.controller.RolloutController` over the fleet state, or a
caller that wants to show what would happen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from edgefleet_core.resources.edge_model import ClassRollout, RolloutPolicy
from edgefleet_operator.fleet.records import AssignmentRecord, HealthAggregate, InstallRecord, WaveRef
from edgefleet_operator.rollout.gates import GateResult


@dataclass(frozen=True)
class RolloutTarget:
    """What one device class should run: a model version, how to roll it out, and whether ``spec.paused``."""

    model_namespace: str
    """The EdgeModel's namespace; the class's devices are the ones enrolled in it."""
    model_name: str
    device_class: str
    version: str
    """The variant version to roll out (the bundle must be published for this class)."""
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    paused: bool = False


@dataclass(frozen=True)
class DeviceState:
    """One device of the class as the planner sees it."""

    name: str
    assignment: AssignmentRecord | None
    """Its current assignment of the model (``None``: never assigned it)."""
    report: InstallRecord | None
    """The latest install report on exactly that assignment (same revision), if the device sent one."""

    def holds(self, version: str) -> bool:
        """Whether the device is assigned to install ``version`` (it is then "updated" to it)."""
        return (
            self.assignment is not None and self.assignment.action == "install" and self.assignment.version == version
        )


@dataclass(frozen=True)
class ClassSnapshot:
    """One class's devices and health for one model, read at one moment."""

    devices: tuple[DeviceState, ...]
    """Enrolled, not revoked devices of the class in the model's namespace, by name."""
    health: tuple[HealthAggregate, ...]
    """The model's health per version in this class (healthy: error rate at most the gate's maximum)."""

    def health_of(self, version: str | None) -> HealthAggregate | None:
        """The aggregate of ``version`` in the class, ``None`` when no device reports or installed it."""
        return next((h for h in self.health if h.version == version), None)


# ------------------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class StartRollout:
    """Begin the rollout at wave 1: a first rollout, or a new version replacing one under way."""

    previous_version: str | None
    """The rollback target: the last version fully rolled out in the class (``None``: nothing to go back to)."""
    replaced_version: str | None
    """The version whose rollout this one replaces (a new spec mid-rollout), if any."""


@dataclass(frozen=True)
class AssignWave:
    """Assign the new version to devices: a wave's new devices, or devices that joined the class since."""

    wave: int
    """1-based wave the devices join in."""
    wave_ref: WaveRef
    """The same wave as the assignments carry it (0-based, with the count and cumulative percent)."""
    version: str
    devices: tuple[str, ...]
    """Device names in rollout order; none of them holds the new version yet."""


@dataclass(frozen=True)
class AdvanceWave:
    """The current wave passed its gate; the next starts (its devices are assigned) after the pause."""

    passed_wave: int
    next_wave: int
    starts_at: datetime
    gate: GateResult


@dataclass(frozen=True)
class Complete:
    """The last wave passed its gate: the class runs the new version."""

    gate: GateResult


@dataclass(frozen=True)
class RollBack:
    """A gate failed: send these devices back to the previous version (``action: rollback``)."""

    version: str
    """The previous version, the one the devices go back to."""
    devices: tuple[str, ...]
    """Every device of the class assigned a version other than ``version``, by name."""
    gate: GateResult | None
    """The failed gate; ``None`` when a rollback already decided is re-applied to devices it missed."""


@dataclass(frozen=True)
class Halt:
    """A gate failed and nothing is rolled back: a first rollout, or ``autoRollback`` is off."""

    gate: GateResult


@dataclass(frozen=True)
class Hold:
    """``spec.paused``: stop where the rollout is; nothing is assigned until it is cleared."""


@dataclass(frozen=True)
class Resume:
    """``spec.paused`` was cleared: carry on at the wave the rollout stopped at."""


@dataclass(frozen=True)
class Wait:
    """Nothing to do now."""

    until: datetime | None
    """When time alone may change the decision (a pause or an observation window ends); ``None``:
    only new reports or a new spec will."""


RolloutAction = StartRollout | AssignWave | AdvanceWave | Complete | RollBack | Halt | Hold | Resume | Wait


@dataclass(frozen=True)
class RolloutDecision:
    """One step of a class's rollout: the action, and the status once it is applied."""

    action: RolloutAction
    status: ClassRollout
    reason: str
    """CamelCase, for a condition reason or an Event (e.g. ``WaveAssigned``, ``ErrorRateHigh``)."""

    @property
    def settled(self) -> bool:
        """Whether the rollout rests here until time passes or the fleet changes (nothing more to apply)."""
        return isinstance(self.action, Wait)
