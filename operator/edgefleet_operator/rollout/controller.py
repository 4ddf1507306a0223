"""The rollout controller: reads a class's snapshot from the fleet state, plans, and applies the plan.

Thin on purpose: every decision is :func:`~edgefleet_operator.rollout.planner.plan_step`'s; this
module only reads the fleet, writes assignments and hands back the status to store. A step is
idempotent: what the fleet already holds is never assigned again, so calling :meth:`step` twice
with nothing changed writes nothing (the assignment HEAD revision stays where it was).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from edgefleet_core.failpoints import failpoint
from edgefleet_core.resources.edge_model import ClassRollout
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.fleet.bundles import ResolvedBundle, resolve_bundle
from edgefleet_operator.fleet.records import InstallRecord, model_key
from edgefleet_operator.fleet.state import FleetState, utc_now
from edgefleet_operator.rollout.decisions import (
    AssignWave,
    ClassSnapshot,
    DeviceState,
    RollBack,
    RolloutDecision,
    RolloutTarget,
    Wait,
)
from edgefleet_operator.rollout.errors import RolloutDidNotSettle
from edgefleet_operator.rollout.planner import plan_step

logger = logging.getLogger(__name__)


class BundleSource(Protocol):
    """Where the controller learns what an assignment of a version names (paths, digest, length)."""

    def resolve(self, *, model_namespace: str, model_name: str, device_class: str, version: str) -> ResolvedBundle:
        """The published bundle of that model version for that class."""
        ...


@dataclass(frozen=True)
class PublishedBundles:
    """Bundles from the signed TUF repository in ``store``, verified as a device will verify them."""

    store: ArtifactStore
    tuf_prefix: str = "tuf/"

    def resolve(self, *, model_namespace: str, model_name: str, device_class: str, version: str) -> ResolvedBundle:
        return resolve_bundle(
            self.store,
            device_class=device_class,
            namespace=model_namespace,
            model=model_name,
            version=version,
            tuf_prefix=self.tuf_prefix,
        )


@dataclass(frozen=True)
class RolloutStep:
    """What one :meth:`RolloutController.step` did."""

    status: ClassRollout
    """The class's rollout status to store (``status.rollout[]`` of the EdgeModel)."""
    decisions: tuple[RolloutDecision, ...]
    """Every decision applied, in order; the last is a :class:`~edgefleet_operator.rollout.decisions.Wait`."""
    revisions: tuple[int, ...]
    """Assignment revisions written (none on a step that changed nothing)."""

    @property
    def requeue_at(self) -> datetime | None:
        """When to step again even if nothing is reported (``None``: on the next report or spec change)."""
        last = self.decisions[-1].action
        return last.until if isinstance(last, Wait) else None


class RolloutController:
    """Runs one model's rollout in one device class over the shared fleet state.

    Stateless: the status it returns is all it needs next time, so any operator replica (or the
    embedded control plane after a restart) can take the next step. Per-class rollouts are
    independent: each call reads and writes only the devices of ``target.device_class``.
    """

    def __init__(self, fleet: FleetState, bundles: BundleSource, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._fleet = fleet
        self._bundles = bundles
        self._clock = clock

    def snapshot(self, target: RolloutTarget) -> ClassSnapshot:
        """The class's devices with their assignment of the model and the report on it, and its health."""
        namespace, model = target.model_namespace, target.model_name
        records = [
            r for r in self._fleet.list_devices(namespace) if r.device_class == target.device_class and not r.revoked
        ]
        names = {r.name for r in records}
        reports: dict[str, list[InstallRecord]] = {}
        for _, name, report in self._fleet.installs(namespace):
            if name in names and (report.model_namespace, report.model_name) == (namespace, model):
                reports.setdefault(name, []).append(report)
        devices = []
        for record in records:
            assignment = self._fleet.assignments_for(namespace, record.name).assignments.get(
                model_key(namespace, model)
            )
            # Only a report on the current assignment counts: one on an earlier assignment of the same
            # version (a rollout retried after a rollback) says nothing about this one.
            answers = [
                r
                for r in reports.get(record.name, [])
                if assignment is not None and (r.revision, r.to_version) == (assignment.revision, assignment.version)
            ]
            latest = max(answers, key=lambda r: r.finished_at, default=None)
            devices.append(DeviceState(name=record.name, assignment=assignment, report=latest))
        health = self._fleet.aggregate(
            namespace,
            model,
            target.device_class,
            healthy_error_rate=target.policy.health_gates.max_error_rate,
        )
        return ClassSnapshot(devices=tuple(devices), health=tuple(health))

    def plan(self, rollout: ClassRollout | None, target: RolloutTarget) -> RolloutDecision:
        """The next decision, without applying it (what :meth:`step` would do first)."""
        return plan_step(rollout, target, self.snapshot(target), self._clock())

    def step(self, rollout: ClassRollout | None, target: RolloutTarget) -> RolloutStep:
        """Apply decisions until the rollout rests; the status to store and what was done.

        ``rollout`` is the status stored by the last step (``None`` before the first). Fleet-state,
        store and bundle errors pass through, with the decisions before them already applied; the
        next step re-plans from the fleet and does not repeat them.
        """
        now = self._clock()  # one reading: every decision of a step sees the same time
        snapshot = self.snapshot(target)
        status = rollout
        decisions: list[RolloutDecision] = []
        revisions: list[int] = []
        bundles: dict[str, ResolvedBundle] = {}
        # Each decision moves the rollout on (a phase, a wave, a set of devices); more than a few per
        # wave means the planner is going round in circles.
        for _ in range(4 * len(target.policy.waves) + 8):
            decision = plan_step(status, target, snapshot, now)
            revision = self._apply(decision, target, bundles)
            decisions.append(decision)
            status = decision.status
            if revision is not None:
                revisions.append(revision)
                snapshot = self.snapshot(target)
            if decision.settled:
                return RolloutStep(status=decision.status, decisions=tuple(decisions), revisions=tuple(revisions))
        raise RolloutDidNotSettle(
            f"rollout of {target.model_namespace}/{target.model_name} in class {target.device_class} did not settle: "
            + " → ".join(d.reason for d in decisions)
        )

    def _apply(
        self, decision: RolloutDecision, target: RolloutTarget, bundles: dict[str, ResolvedBundle]
    ) -> int | None:
        """Write what ``decision`` assigns; the revision written, ``None`` when it assigns nothing."""
        action = decision.action
        where = f"[{target.model_namespace}/{target.model_name}] class {target.device_class}"
        if not isinstance(action, AssignWave | RollBack):
            if not decision.settled:
                logger.info("%s: %s (%s)", where, decision.reason, decision.status.message)
            return None
        if not action.devices:
            return None
        if action.version not in bundles:
            bundles[action.version] = self._bundles.resolve(
                model_namespace=target.model_namespace,
                model_name=target.model_name,
                device_class=target.device_class,
                version=action.version,
            )
        bundle = bundles[action.version]
        revision = self._fleet.assign(
            target.model_namespace,
            action.devices,
            model_namespace=target.model_namespace,
            model_name=target.model_name,
            version=action.version,
            action="install" if isinstance(action, AssignWave) else "rollback",
            target_paths=bundle.target_paths,
            bundle_sha256=bundle.bundle_sha256,
            bundle_length=bundle.bundle_length,
            wave=action.wave_ref if isinstance(action, AssignWave) else None,
        )
        logger.info("%s: %s at revision %d (%s)", where, decision.reason, revision, decision.status.message)
        failpoint("operator.rollout.wave")  # the wave is in the fleet state; the EdgeModel's status is not
        return revision
