"""EdgeModel status conditions, the Kubernetes way, so kstatus (Flux, Argo CD) reads health without custom code.

Conditions:

- ``Optimized``, ``Published``, ``RolledOut``, ``Degraded``: what the reconciler observed, set with
  :func:`set_condition`;
- ``Ready``, ``Reconciling``, ``Stalled``: the summary kstatus reads, derived by :func:`summarize`.
  ``Ready`` = Optimized ∧ Published ∧ RolledOut ∧ ¬Degraded ∧ ¬Stalled. ``Stalled`` is true when
  the user must act: a spec error, or a rollout that failed its gate (degraded) with nothing left
  in progress, since only a new spec restarts it. ``Reconciling`` is true while work goes on.

``lastTransitionTime`` moves only when a condition's status changes, and every condition carries the
``observedGeneration`` it was computed for; conditions are kept in one fixed order, so the same
observations always give the same status (a restarted operator writes nothing new).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from edgefleet_core.resources.base import Condition, ConditionStatus

READY: Final = "Ready"
RECONCILING: Final = "Reconciling"
STALLED: Final = "Stalled"
OPTIMIZED: Final = "Optimized"
PUBLISHED: Final = "Published"
ROLLED_OUT: Final = "RolledOut"
DEGRADED: Final = "Degraded"
CONDITION_TYPES: Final = (READY, RECONCILING, STALLED, OPTIMIZED, PUBLISHED, ROLLED_OUT, DEGRADED)
"""Every condition type the reconciler writes, in the order the status lists them."""
PROGRESS_TYPES: Final = (OPTIMIZED, PUBLISHED, ROLLED_OUT)
"""What must all be true for the model to be ready (besides not degraded, not stalled)."""

SUCCEEDED: Final = "Succeeded"
"""Reason of ``Ready`` when true, and of ``Reconciling`` when false because everything is done."""
AS_EXPECTED: Final = "AsExpected"
"""Reason of an abnormal-true condition (``Stalled``) when it is false."""
PENDING: Final = "Pending"
"""Reason given for a progress condition that was never reported."""
STALLED_REASON: Final = "Stalled"
"""Reason of ``Reconciling`` when false because the model is stalled."""

MAX_MESSAGE: Final = 32768
"""The CRD's (and metav1.Condition's) cap on a condition message."""


@dataclass(frozen=True)
class StatusReason:
    """Why a condition has its status: a CamelCase reason and a message for people."""

    reason: str
    message: str


def find_condition(conditions: Sequence[Condition] | None, condition_type: str) -> Condition | None:
    """The condition of that type, or ``None``."""
    return next((c for c in conditions or [] if c.type == condition_type), None)


def is_true(conditions: Sequence[Condition] | None, condition_type: str) -> bool:
    """Whether the condition is present with status ``True``."""
    found = find_condition(conditions, condition_type)
    return found is not None and found.status == "True"


def _order(condition: Condition) -> tuple[int, str]:
    known = condition.type in CONDITION_TYPES
    return (CONDITION_TYPES.index(condition.type) if known else len(CONDITION_TYPES), condition.type)


def _fit(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def set_condition(
    conditions: Sequence[Condition] | None,
    condition_type: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """``conditions`` with ``condition_type`` set (a new list; conditions are immutable).

    ``lastTransitionTime`` is kept when the status stays the same (only reason or message change),
    else it is ``now`` to the second (Kubernetes timestamps carry seconds). ``now`` must carry a time zone.
    """
    wire_status: ConditionStatus = "True" if status else "False"
    previous = find_condition(conditions, condition_type)
    if previous is not None and previous.status == wire_status:
        since = previous.last_transition_time
    else:
        since = now.replace(microsecond=0)
    updated = Condition(
        type=condition_type,
        status=wire_status,
        observed_generation=generation,
        last_transition_time=since,
        reason=reason,
        message=_fit(message),
    )
    others = [c for c in conditions or [] if c.type != condition_type]
    return sorted([*others, updated], key=_order)


def _first_unmet(conditions: Sequence[Condition]) -> StatusReason | None:
    """Why the model is not (yet) optimized, published and rolled out; ``None`` when it is."""
    for condition_type in PROGRESS_TYPES:
        found = find_condition(conditions, condition_type)
        if found is None:
            return StatusReason(PENDING, f"{condition_type} is not reported yet")
        if found.status != "True":
            return StatusReason(found.reason, found.message)
    return None


def summarize(
    conditions: Sequence[Condition] | None,
    *,
    generation: int | None,
    now: datetime,
    stalled: StatusReason | None = None,
    progressing: StatusReason | None = None,
) -> list[Condition]:
    """``conditions`` with ``Ready``, ``Reconciling`` and ``Stalled`` derived from the others.

    ``stalled``: a problem only the user can fix (a spec error), which makes the model stalled.
    ``progressing``: work still going on that the other conditions may not show (a rollout wave
    waiting on its gate, a retry after a store failure): it keeps ``Reconciling`` true, and it keeps
    a degraded model from counting as stalled while its rollback is still being applied.
    """
    current = list(conditions or [])
    degraded = find_condition(current, DEGRADED)
    is_degraded = degraded is not None and degraded.status == "True"
    if stalled is None and is_degraded and progressing is None:
        assert degraded is not None  # narrowed by is_degraded
        stalled = StatusReason(degraded.reason, degraded.message)
    unmet = _first_unmet(current)

    if stalled is not None:
        ready = StatusReason(stalled.reason, stalled.message)
    elif is_degraded:
        assert degraded is not None
        ready = StatusReason(degraded.reason, degraded.message)
    else:
        ready = unmet or StatusReason(SUCCEEDED, _rolled_out_message(current))
    is_ready = stalled is None and not is_degraded and unmet is None

    if stalled is not None:
        reconciling: tuple[bool, StatusReason] = (
            False,
            StatusReason(STALLED_REASON, "nothing more can be done until the spec (or a DeviceClass) changes"),
        )
    elif progressing is not None:
        reconciling = (True, progressing)
    elif not is_ready:
        reconciling = (True, ready)
    else:
        reconciling = (False, StatusReason(SUCCEEDED, "everything the spec asks for is done"))

    for condition_type, status, why in (
        (READY, is_ready, ready),
        (RECONCILING, *reconciling),
        (STALLED, stalled is not None, stalled or StatusReason(AS_EXPECTED, "")),
    ):
        current = set_condition(
            current, condition_type, status, why.reason, why.message, generation=generation, now=now
        )
    return current


def _rolled_out_message(conditions: Sequence[Condition]) -> str:
    found = find_condition(conditions, ROLLED_OUT)
    return found.message if found is not None else ""
