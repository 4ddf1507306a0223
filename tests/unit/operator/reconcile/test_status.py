"""Conditions the Kubernetes way: transition times, observed generation, and the Ready/Reconciling/Stalled summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.edge_model import EdgeModelStatus
from edgefleet_operator.reconcile import (
    CONDITION_TYPES,
    DEGRADED,
    OPTIMIZED,
    PUBLISHED,
    READY,
    RECONCILING,
    ROLLED_OUT,
    STALLED,
    StatusReason,
    find_condition,
    is_true,
    set_condition,
    summarize,
)
from edgefleet_operator.reconcile.status import MAX_MESSAGE

T0 = datetime(2026, 11, 22, 10, 0, 0, 654321, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def _get(conditions: list[Condition], condition_type: str) -> Condition:
    found = find_condition(conditions, condition_type)
    assert found is not None, condition_type
    return found


def _progress(optimized: bool = True, published: bool = True, rolled_out: bool = True) -> list[Condition]:
    conditions: list[Condition] = []
    for condition_type, status, reason in (
        (OPTIMIZED, optimized, "VariantsBuilt" if optimized else "Optimizing"),
        (PUBLISHED, published, "BundlesPublished" if published else "Publishing"),
        (ROLLED_OUT, rolled_out, "RolloutSucceeded" if rolled_out else "RolloutProgressing"),
    ):
        conditions = set_condition(
            conditions, condition_type, status, reason, f"{condition_type} says {reason}", generation=3, now=T0
        )
    return set_condition(conditions, DEGRADED, False, "Healthy", "", generation=3, now=T0)


def test_new_condition_takes_now_to_the_second_and_the_generation() -> None:
    conditions = set_condition(None, OPTIMIZED, True, "VariantsBuilt", "2 classes", generation=4, now=T0)
    (optimized,) = conditions
    assert optimized.status == "True"
    assert optimized.observed_generation == 4
    assert optimized.last_transition_time == T0.replace(microsecond=0)
    assert optimized.to_wire()["lastTransitionTime"] == "2026-11-22T10:00:00Z"


def test_same_status_keeps_the_transition_time_and_updates_the_rest() -> None:
    first = set_condition(None, PUBLISHED, False, "Publishing", "1 of 2", generation=1, now=T0)
    second = set_condition(first, PUBLISHED, False, "Publishing", "2 of 3", generation=2, now=T1)
    (published,) = second
    assert published.last_transition_time == T0.replace(microsecond=0)
    assert (published.message, published.observed_generation) == ("2 of 3", 2)
    flipped = set_condition(second, PUBLISHED, True, "BundlesPublished", "3 of 3", generation=2, now=T1)
    assert flipped[0].last_transition_time == T1.replace(microsecond=0)
    assert first[0].message == "1 of 2"  # the input is never changed


def test_conditions_keep_one_order_whatever_the_call_order() -> None:
    one = set_condition(None, DEGRADED, False, "Healthy", "", generation=1, now=T0)
    one = set_condition(one, OPTIMIZED, True, "VariantsBuilt", "", generation=1, now=T0)
    one = set_condition(one, "Custom", True, "Something", "", generation=1, now=T0)
    two = set_condition(None, "Custom", True, "Something", "", generation=1, now=T0)
    two = set_condition(two, OPTIMIZED, True, "VariantsBuilt", "", generation=1, now=T0)
    two = set_condition(two, DEGRADED, False, "Healthy", "", generation=1, now=T0)
    assert one == two
    assert [c.type for c in one] == [OPTIMIZED, DEGRADED, "Custom"]


def test_long_messages_are_cut_to_the_schema_limit() -> None:
    (condition,) = set_condition(None, STALLED, True, "SpecError", "x" * (MAX_MESSAGE + 10), generation=1, now=T0)
    assert len(condition.message) == MAX_MESSAGE
    assert condition.message.endswith("…")


def test_everything_done_is_ready() -> None:
    conditions = summarize(_progress(), generation=3, now=T1)
    assert [c.type for c in conditions] == list(CONDITION_TYPES)
    ready, reconciling, stalled = (_get(conditions, t) for t in (READY, RECONCILING, STALLED))
    assert (ready.status, ready.reason, ready.message) == ("True", "Succeeded", "RolledOut says RolloutSucceeded")
    assert (reconciling.status, reconciling.reason) == ("False", "Succeeded")
    assert (stalled.status, stalled.reason) == ("False", "AsExpected")
    assert {c.observed_generation for c in conditions} == {3}
    # The status validates as the CRD's (unique condition types, reasons and messages in bounds).
    EdgeModelStatus(conditions=conditions)


def test_the_first_unmet_condition_explains_not_ready() -> None:
    conditions = summarize(_progress(published=False, rolled_out=False), generation=3, now=T1)
    ready, reconciling = _get(conditions, READY), _get(conditions, RECONCILING)
    assert (ready.status, ready.reason, ready.message) == ("False", "Publishing", "Published says Publishing")
    assert (reconciling.status, reconciling.reason) == ("True", "Publishing")
    assert not is_true(conditions, STALLED)


def test_unreported_conditions_are_pending() -> None:
    conditions = summarize(None, generation=1, now=T0)
    ready = _get(conditions, READY)
    assert (ready.status, ready.reason) == ("False", "Pending")
    assert "Optimized" in ready.message
    assert is_true(conditions, RECONCILING)


def test_a_spec_error_stalls_and_stops_reconciling() -> None:
    problem = StatusReason("SpecError", "spec.targets.deviceClasses[0]: DeviceClass 'x' does not exist")
    conditions = summarize(_progress(), generation=4, now=T1, stalled=problem)
    stalled, ready, reconciling = (_get(conditions, t) for t in (STALLED, READY, RECONCILING))
    assert (stalled.status, stalled.reason, stalled.message) == ("True", problem.reason, problem.message)
    assert (ready.status, ready.reason) == ("False", "SpecError")
    assert (reconciling.status, reconciling.reason) == ("False", "Stalled")


def test_a_finished_rollback_is_stalled_until_a_new_spec() -> None:
    conditions = set_condition(
        _progress(), DEGRADED, True, "RolledBack", "cpu-small: error rate 0.4", generation=3, now=T1
    )
    summary = summarize(conditions, generation=3, now=T1)
    stalled, ready = _get(summary, STALLED), _get(summary, READY)
    assert (stalled.status, stalled.reason) == ("True", "RolledBack")
    assert (ready.status, ready.reason, ready.message) == ("False", "RolledBack", "cpu-small: error rate 0.4")
    assert not is_true(summary, RECONCILING)


def test_a_rollback_in_progress_is_reconciling_not_stalled() -> None:
    conditions = set_condition(_progress(), DEGRADED, True, "RolledBack", "rolling back", generation=3, now=T1)
    summary = summarize(conditions, generation=3, now=T1, progressing=StatusReason("RollingBack", "2 of 5 devices"))
    assert not is_true(summary, STALLED)
    assert not is_true(summary, READY)
    reconciling = _get(summary, RECONCILING)
    assert (reconciling.status, reconciling.reason, reconciling.message) == ("True", "RollingBack", "2 of 5 devices")


def test_progress_keeps_reconciling_true_while_ready() -> None:
    retry = StatusReason("StoreUnavailable", "retrying in 10 s")
    summary = summarize(_progress(), generation=3, now=T1, progressing=retry)
    assert is_true(summary, READY)
    assert _get(summary, RECONCILING).reason == "StoreUnavailable"


def test_summarizing_again_changes_nothing() -> None:
    once = summarize(_progress(), generation=3, now=T1)
    assert summarize(once, generation=3, now=T1 + timedelta(hours=1)) == once
