"""What the demo sees of the system, read the way an operator would: stored statuses and fleet state.

:class:`FleetWatch` polls the embedded API (the EdgeModel's status, written by the control plane)
and the fleet state in the artifact store (assignments, install reports, aggregated health), and
remembers what it saw (every version each device was ever assigned), so a fault's verdict rests on
the whole run, not on the last look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.resources.edge_model import ClassRollout, EdgeModelStatus, Variant
from edgefleet_operator.fleet.records import AssignmentRecord, HealthAggregate, InstallRecord, model_key
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.local.api import LocalApi
from edgefleet_operator.local.manifests import ObjectKey


@dataclass
class DeviceView:
    """One device as last seen in the fleet state."""

    assignment: AssignmentRecord | None = None
    installs: dict[int, InstallRecord] = field(default_factory=dict)
    """Install reports by assignment revision."""
    ever_installed: set[str] = field(default_factory=set)
    """Versions the fleet ever assigned it with ``action: install``."""

    def report_for_current(self) -> InstallRecord | None:
        return None if self.assignment is None else self.installs.get(self.assignment.revision)

    def report_for(self, version: str) -> InstallRecord | None:
        """The latest install report of ``version`` (the device may have been given it more than once)."""
        found = [r for r in self.installs.values() if r.to_version == version]
        return max(found, key=lambda r: r.revision) if found else None


class FleetWatch:
    """Polls the model's status and the fleet; not thread-safe (the demo's main loop owns it)."""

    def __init__(
        self, api: LocalApi, fleet: FleetState, namespace: str, model: str, *, healthy_error_rate: float
    ) -> None:
        """``healthy_error_rate``: the rollout gate's ``maxErrorRate``, so "healthy" means what the gate means."""
        self._api = api
        self._healthy_error_rate = healthy_error_rate
        self._fleet = fleet
        self._namespace = namespace
        self._model = model
        self._key = ObjectKey("EdgeModel", namespace, model)
        self.status: EdgeModelStatus | None = None
        self.generation = 0
        self.devices: dict[str, DeviceView] = {}
        self.health: dict[tuple[str, str], HealthAggregate] = {}
        """Aggregated health by (class, version)."""
        self.problem: str | None = None
        """The last read failure (the store busy, a file being replaced); the next poll tries again."""

    def poll(self, device_names: list[str]) -> None:
        try:
            stored = self._api.get(self._key)
            if stored is not None:
                self.generation = stored.generation
                self.status = stored.edge_model().status
            for name in device_names:
                view = self.devices.setdefault(name, DeviceView())
                held = self._fleet.assignments_for(self._namespace, name).assignments
                view.assignment = held.get(model_key(self._namespace, self._model))
                if view.assignment is not None and view.assignment.action == "install":
                    view.ever_installed.add(view.assignment.version)
            for _, device, record in self._fleet.installs(self._namespace):
                if record.model_name == self._model and device in self.devices:
                    self.devices[device].installs[record.revision] = record
            aggregates = self._fleet.aggregate(
                self._namespace, self._model, healthy_error_rate=self._healthy_error_rate
            )
            self.health = {(a.device_class, a.version): a for a in aggregates}
            self.problem = None
        except (EdgeFleetError, OSError, ValueError) as exc:
            # A status being rewritten or a store hiccup: keep the last view, look again next time.
            self.problem = str(exc)

    # ------------------------------------------------------------------ the model's status

    def rollout(self, device_class: str) -> ClassRollout | None:
        rollouts = self.status.rollout if self.status is not None else None
        return next((r for r in rollouts or [] if r.device_class == device_class), None)

    def variant(self, device_class: str) -> Variant | None:
        variants = self.status.variants if self.status is not None else None
        return next((v for v in variants or [] if v.device_class == device_class), None)

    def current(self) -> bool:
        """Whether the status covers the latest spec (the control plane saw the last file change)."""
        return self.status is not None and self.status.observed_generation == self.generation

    def rolled_out(self, device_class: str, version: str) -> bool:
        found = self.rollout(device_class)
        return found is not None and found.version == version and found.phase == "Succeeded"
