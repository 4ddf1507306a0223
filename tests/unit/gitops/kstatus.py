"""kstatus's status computation for a custom resource, ported from its Go source, for the tests.

Flux (kustomize-controller's ``wait``/``healthChecks``, helm-controller's ``watcher`` wait) and
``kubectl``-style tools compute a resource's health with kstatus
(``sigs.k8s.io/cli-utils/pkg/kstatus/status``). Porting it lets the tests ask what Flux would say
about a status the reconciler wrote, without a cluster.

Ported, rule by rule, from kubernetes-sigs/cli-utils ``pkg/kstatus/status``:

- ``status.go`` ``Compute``: the generic checks; then a type-specific function for built-in kinds
  (``core.go`` ``legacyTypes``: never an ``edgefleet.io`` kind, so not ported); then
  ``checkReadyCondition``; otherwise ``Current`` ("the absence of any known conditions means the
  resource is current").
- ``generic.go`` ``checkGenericProperties``: ``metadata.deletionTimestamp`` set → ``Terminating``;
  ``checkGeneration``: ``metadata.generation`` present and ``status.observedGeneration`` present and
  different → ``InProgress`` (reason ``LatestGenerationNotObserved``; an absent observedGeneration
  skips the check); then, in the order the conditions are listed, the first ``Reconciling=True`` →
  ``InProgress`` or ``Stalled=True`` → ``Failed``.
- ``status.go`` ``checkReadyCondition``: the first ``Ready`` condition: ``True`` → ``Current``,
  ``False`` or ``Unknown`` → ``InProgress``.
- ``unstructured.NestedString`` / ``NestedInt64`` and ``GetObjectWithConditions``
  (``util.go``): a field of the wrong type is an error, not a status; :class:`KstatusError` here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

Status = Literal["InProgress", "Failed", "Current", "Terminating"]

LEGACY_GROUP_KINDS: Final = frozenset(
    {
        *("Service", "Pod", "Secret", "PersistentVolumeClaim", "ConfigMap"),
        *("apps/StatefulSet", "apps/DaemonSet", "extensions/DaemonSet", "apps/Deployment"),
        *("extensions/Deployment", "apps/ReplicaSet", "extensions/ReplicaSet", "policy/PodDisruptionBudget"),
        *("batch/CronJob", "batch/Job", "apiextensions.k8s.io/CustomResourceDefinition"),
    }
)
"""``core.go`` ``legacyTypes``: kinds kstatus has its own rules for (this port refuses them)."""


class KstatusError(ValueError):
    """kstatus returns an error instead of a status (a field of the wrong type)."""


@dataclass(frozen=True)
class Result:
    status: Status
    message: str
    reason: str = ""


_MISSING: Final = object()


def _nested(obj: Mapping[str, Any], *fields: str) -> Any:
    """``unstructured.NestedFieldNoCopy``: the value, ``_MISSING``, or an error when a step is not a map."""
    value: Any = obj
    for index, name in enumerate(fields):
        if not isinstance(value, Mapping):
            path = ".".join(fields[:index])
            raise KstatusError(f"{path} accessor error: {value!r} is of the type {type(value).__name__}, expected map")
        if name not in value:
            return _MISSING
        value = value[name]
    return value


def _nested_string(obj: Mapping[str, Any], *fields: str) -> str | None:
    value = _nested(obj, *fields)
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        raise KstatusError(f"{'.'.join(fields)} accessor error: {value!r} is not a string")
    return value


def _nested_int64(obj: Mapping[str, Any], *fields: str) -> int | None:
    value = _nested(obj, *fields)
    if value is _MISSING:
        return None
    # JSON numbers reach unstructured as int64 or float64; only int64 passes NestedInt64.
    if isinstance(value, bool) or not isinstance(value, int):
        raise KstatusError(f"{'.'.join(fields)} accessor error: {value!r} is not an int64")
    return value


@dataclass(frozen=True)
class _Condition:
    type: str
    status: str
    reason: str
    message: str


def _conditions(obj: Mapping[str, Any]) -> list[_Condition]:
    """``GetObjectWithConditions``: ``status.conditions`` converted as ``FromUnstructured`` would."""
    status = obj.get("status")
    if status is None:
        return []
    if not isinstance(status, Mapping):
        raise KstatusError(f"status: cannot convert {type(status).__name__} to a struct")
    items = status.get("conditions")
    if items is None:
        return []
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise KstatusError(f"status.conditions: cannot convert {type(items).__name__} to a slice")
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise KstatusError(f"status.conditions: cannot convert {type(item).__name__} to a struct")
        fields = {name: item.get(name, "") for name in ("type", "status", "reason", "message")}
        for name, value in fields.items():
            if not isinstance(value, str):
                raise KstatusError(f"status.conditions[].{name}: cannot convert {type(value).__name__} to a string")
        out.append(_Condition(**fields))
    return out


def _group_kind(obj: Mapping[str, Any]) -> str:
    api_version = str(obj.get("apiVersion", ""))
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    kind = str(obj.get("kind", ""))
    return f"{group}/{kind}" if group else kind


def _check_generation(obj: Mapping[str, Any]) -> Result | None:
    generation = _nested_int64(obj, "metadata", "generation")
    if generation is None:
        return None
    observed = _nested_int64(obj, "status", "observedGeneration")
    if observed is not None and observed != generation:
        message = f"{obj.get('kind')} generation is {generation}, but latest observed generation is {observed}"
        return Result("InProgress", message, "LatestGenerationNotObserved")
    return None


def _check_generic_properties(obj: Mapping[str, Any]) -> Result | None:
    deletion = _nested_string(obj, "metadata", "deletionTimestamp")
    if deletion:
        return Result("Terminating", "Resource scheduled for deletion")
    by_generation = _check_generation(obj)
    if by_generation is not None:
        return by_generation
    for condition in _conditions(obj):
        if condition.type == "Reconciling" and condition.status == "True":
            return Result("InProgress", condition.message, condition.reason)
        if condition.type == "Stalled" and condition.status == "True":
            return Result("Failed", condition.message, condition.reason)
    return None


def _check_ready_condition(obj: Mapping[str, Any]) -> Result | None:
    for condition in _conditions(obj):
        if condition.type != "Ready":
            continue
        if condition.status == "True":
            return Result("Current", "Resource is Ready")
        if condition.status in ("False", "Unknown"):
            return Result("InProgress", condition.message, condition.reason)
    return None


def compute(obj: Mapping[str, Any]) -> Result:
    """kstatus ``Compute`` for a custom resource (``obj`` as the API server returns it)."""
    if _group_kind(obj) in LEGACY_GROUP_KINDS:
        raise NotImplementedError(f"kstatus has kind-specific rules for {_group_kind(obj)}; not ported")
    return _check_generic_properties(obj) or _check_ready_condition(obj) or Result("Current", "Resource is current")
