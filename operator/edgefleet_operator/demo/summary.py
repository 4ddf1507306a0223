"""From what the demo observed to the record's rows: pure functions, so each is tested on its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgefleet_core.resources.edge_model import Variant
from edgefleet_operator.demo.inference import VersionStats
from edgefleet_operator.demo.observe import DeviceView
from edgefleet_operator.demo.record import Candidate, ClassSummary, DeviceRow
from edgefleet_operator.fleet.records import HealthAggregate

_REPORTED: Mapping[str, str] = {
    "refused_verification": "refused {version}",
    "rolled_back": "rolled back from {version}",
    "failed": "install of {version} failed",
}
"""The state of a device whose latest install report did not succeed."""
LATENCIES_KEPT = 2000
"""Latencies per device kept in a row (the live table's percentiles; the report's plot)."""


def device_state(ready: bool, view: DeviceView | None, serving: str | None) -> str:
    """What a device is doing, in the live table's words."""
    if not ready:
        return "starting"
    assignment = view.assignment if view is not None else None
    if view is None or assignment is None:
        return "serving" if serving else "enrolled"
    report = view.report_for_current()
    if report is None:
        verb = "rolling back to" if assignment.action == "rollback" else "installing"
        return f"{verb} {assignment.version}"
    if report.outcome in _REPORTED:
        return _REPORTED[report.outcome].format(version=report.to_version)
    if assignment.action == "rollback":
        return "rolled back"
    return "serving" if serving == assignment.version else f"installed {assignment.version}"


def device_row(
    name: str, device_class: str, state: str, stats: Mapping[str, VersionStats], serving: str | None
) -> DeviceRow:
    served = stats.get(serving) if serving is not None else None
    return DeviceRow(
        name=name,
        device_class=device_class,
        version=serving,
        state=state,
        requests=sum(s.requests for s in stats.values()),
        errors=sum(s.errors for s in stats.values()),
        correct=sum(s.correct for s in stats.values()),
        latencies_ms=tuple(served.latencies_ms[-LATENCIES_KEPT:]) if served is not None else (),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank, as :meth:`DeviceRow.percentile`); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def class_summary(
    variant: Variant,
    *,
    source_bytes: int,
    served: Sequence[VersionStats],
    devices_total: int,
    health: HealthAggregate | None,
    build: Mapping[str, Any] | None = None,
) -> ClassSummary:
    """One class's row: the published variant's figures, and what its devices served (``served``, one per device).

    Accuracy is what the devices answered right on the digits test set; the pipeline's own figure
    stands in when nothing was answered. Healthy devices are the fleet's own count (the health the
    agents reported, aggregated as the rollout's gates see it).
    """
    answered = sum(s.requests - s.errors for s in served)
    accuracy = sum(s.correct for s in served) / answered if answered else variant.accuracy
    latencies = [ms for s in served for ms in s.latencies_ms]
    baseline = (
        variant.accuracy - variant.accuracy_delta
        if variant.accuracy is not None and variant.accuracy_delta is not None
        else None
    )
    passes = "+".join(variant.passes or []) or "variant"
    return ClassSummary(
        device_class=variant.device_class,
        version=variant.version,
        source_bytes=source_bytes,
        variant_bytes=variant.size_bytes,
        baseline_accuracy=baseline,
        accuracy=accuracy,
        partition_cut=", ".join(variant.partition.cut or []) if variant.partition is not None else None,
        p50_ms=percentile(latencies, 0.5),
        p95_ms=percentile(latencies, 0.95),
        devices_total=devices_total,
        devices_healthy=min(devices_total, health.devices_healthy) if health is not None else 0,
        candidates=_candidates(build, variant, passes, source_bytes, baseline),
    )


def describe_variant(variant: Variant) -> str:
    """One line on a published variant, for the console."""
    passes = ", ".join(variant.passes or [])
    accuracy = "-" if variant.accuracy is None else f"{100 * variant.accuracy:.1f} %"
    partition = variant.partition
    if partition is not None:
        where = (
            f"cut at {', '.join(partition.cut or [])}: head on {partition.head_execution_provider}, "
            f"tail on {partition.tail_execution_provider}, pipelined"
        )
    else:
        where = "whole model on the CPU"
    return (
        f"{variant.device_class}: version {variant.version}, {variant.size_bytes / 1024:.1f} KiB ({passes}), "
        f"accuracy {accuracy}, {where}"
    )


def stage_note(device_class: str, served: Sequence[VersionStats]) -> str | None:
    """Where the agents of a class spent a request, on average, by their own stage timings."""
    answered = sum(s.requests - s.errors for s in served)
    totals: dict[str, float] = {}
    for stats in served:
        for stage, ms in stats.stage_ms.items():
            totals[stage] = totals.get(stage, 0.0) + ms
    if not answered or not totals:
        return None
    order: tuple[str, ...] = ("queue", "head", "transfer", "tail", "run", "total")
    shown = [s for s in order if s in totals] + sorted(set(totals) - set(order))
    parts = ", ".join(f"{stage} {totals[stage] / answered:.3f} ms" for stage in shown)
    how = "partitioned and pipelined" if "head" in totals and "tail" in totals else "whole model"
    return f"{device_class}: {how}; on the agents, per request: {parts}"


def _candidates(
    build: Mapping[str, Any] | None, variant: Variant, passes: str, source_bytes: int, baseline: float | None
) -> tuple[Candidate, ...]:
    """Every candidate the build measured, with the FP32 model; without the build's summary (a build
    adopted from the store), the FP32 source and the published variant, the two ends of the choice."""
    figures = build.get("candidates") if build is not None else None
    if not isinstance(figures, list) or not figures:
        return (
            Candidate("FP32 source", source_bytes, baseline, None, accepted=True, chosen=False),
            Candidate(
                passes,
                variant.size_bytes,
                variant.accuracy,
                variant.latency_ms.p50 if variant.latency_ms is not None else None,
                accepted=True,
                chosen=True,
            ),
        )
    assert build is not None
    fp32 = build.get("baseline") or {}
    found = [
        Candidate(
            "FP32",
            int(fp32.get("sizeBytes") or source_bytes),
            _number(fp32.get("accuracy")),
            _number(fp32.get("p50Ms")),
            accepted=True,
            chosen=False,
        )
    ]
    for item in figures:
        if not isinstance(item, dict) or "sizeBytes" not in item:
            continue  # not evaluated (refused before measuring): nothing to plot
        found.append(
            Candidate(
                str(item.get("name", "?")),
                int(item["sizeBytes"]),
                _number(item.get("accuracy")),
                _number(item.get("p50Ms")),
                accepted=bool(item.get("accepted")),
                chosen=item.get("name") == build.get("candidate"),
            )
        )
    return tuple(found)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
