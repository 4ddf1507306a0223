"""Which DeviceClasses an EdgeModel targets: the classes it names plus those its selector matches."""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import Targets
from edgefleet_operator.reconcile.errors import SpecError


def resolve_targets(targets: Targets, classes: Sequence[DeviceClass]) -> list[DeviceClass]:
    """The targeted classes, sorted by name; :class:`SpecError` for a missing name or when nothing matches.

    A class both named and selected counts once. Every named class must exist: a typo must stall
    the model, not silently shrink its fleet.
    """
    by_name = {c.metadata.name: c for c in classes}
    chosen: dict[str, DeviceClass] = {}
    for index, name in enumerate(targets.device_classes or []):
        found = by_name.get(name)
        if found is None:
            raise SpecError(f"spec.targets.deviceClasses[{index}]", f"DeviceClass {name!r} does not exist")
        chosen[name] = found
    if targets.selector is not None:
        for name, device_class in by_name.items():
            if targets.selector.matches(device_class.metadata.labels):
                chosen[name] = device_class
    if not chosen:
        known = ", ".join(sorted(by_name)) or "none exist"
        raise SpecError("spec.targets", f"the selector matches no DeviceClass (DeviceClasses: {known})")
    return [chosen[name] for name in sorted(chosen)]


def targets_class(targets: Targets, device_class: DeviceClass) -> bool:
    """Whether ``targets`` takes in ``device_class`` (by name or by its labels): a class change re-plans such models."""
    name = device_class.metadata.name
    if name in (targets.device_classes or []):
        return True
    return targets.selector is not None and targets.selector.matches(device_class.metadata.labels)
