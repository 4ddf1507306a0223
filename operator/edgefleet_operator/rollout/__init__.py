"""Health-gated rollouts of a model version to a device class, wave by wave, with automatic rollback.

Transport-free: the kopf operator and the embedded control plane both call it. Layers:

- :mod:`.waves`: which devices are in which wave (hash-ranked, stable as the class grows);
- :mod:`.gates`: whether the devices updated so far are healthy enough to go on (pure);
- :mod:`.planner`: :func:`plan_step`, the next decision from a status, a target, a snapshot, a time (pure);
- :mod:`.controller`: :class:`RolloutController`, which reads the snapshot from the fleet state,
  applies decisions as assignments, and returns the status to store.
"""

from edgefleet_operator.rollout.controller import BundleSource, PublishedBundles, RolloutController, RolloutStep
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
from edgefleet_operator.rollout.errors import RolloutDidNotSettle, RolloutError, RolloutInputError
from edgefleet_operator.rollout.gates import GateReason, GateResult, GateVerdict, WaveEvidence, evaluate_gate
from edgefleet_operator.rollout.planner import plan_step, rollback_target
from edgefleet_operator.rollout.waves import WavePlan, plan_waves, rollout_rank, wave_sizes

__all__ = [
    "AdvanceWave",
    "AssignWave",
    "BundleSource",
    "ClassSnapshot",
    "Complete",
    "DeviceState",
    "GateReason",
    "GateResult",
    "GateVerdict",
    "Halt",
    "Hold",
    "PublishedBundles",
    "Resume",
    "RollBack",
    "RolloutAction",
    "RolloutController",
    "RolloutDecision",
    "RolloutDidNotSettle",
    "RolloutError",
    "RolloutInputError",
    "RolloutStep",
    "RolloutTarget",
    "StartRollout",
    "Wait",
    "WaveEvidence",
    "WavePlan",
    "evaluate_gate",
    "plan_step",
    "plan_waves",
    "rollback_target",
    "rollout_rank",
    "wave_sizes",
]
