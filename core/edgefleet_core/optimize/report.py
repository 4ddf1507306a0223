"""The optimization report: ``report.json`` (every candidate and why it won or lost) and ``report.png``."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI: render to files only
import matplotlib.pyplot as plt

from edgefleet_core.optimize.evaluate import Evaluation
from edgefleet_core.optimize.model_io import LoadedModel
from edgefleet_core.optimize.pipeline import ClassOptimization
from edgefleet_core.optimize.runtime import available_providers

REPORT_VERSION = 1


def _evaluation(evaluation: Evaluation | None, baseline: Evaluation) -> dict[str, Any] | None:
    if evaluation is None:
        return None
    out = asdict(evaluation)
    out["accuracy_delta"] = evaluation.score - baseline.score
    out["size_ratio"] = baseline.size_bytes / evaluation.size_bytes if evaluation.size_bytes else None
    base, ours = baseline.latency.p50_ms, evaluation.latency.p50_ms
    out["latency_speedup_p50"] = base / ours if base and ours else None
    return out


def report_dict(source: LoadedModel, result: ClassOptimization) -> dict[str, Any]:
    """The JSON-ready report (a contract: tools read it; bump REPORT_VERSION on breaking changes)."""
    return {
        "reportVersion": REPORT_VERSION,
        "source": {
            "path": str(source.path),
            "sha256": source.digest,
            "notes": source.notes,
        },
        "deviceClass": result.device_class,
        "executionProvider": result.execution_provider,
        "providersAvailableHere": available_providers(),
        "objective": result.objective,
        "maxAccuracyDrop": result.max_accuracy_drop,
        "budgetUnit": (
            "absolute mean error" if result.baseline.metric == "meanAbsoluteError" else "fraction (0.01 = 1 point)"
        ),
        "energyNote": "package-level RAPL energy over the timed runs divided by the runs: includes other "
        "activity on the machine, an upper bound",
        "data": {"synthetic": result.plan.synthetic, "description": result.plan.description},
        "metric": result.baseline.metric,
        "baseline": _evaluation(result.baseline, result.baseline),
        "candidates": [
            {
                "name": c.name,
                "origin": c.origin,
                "variantId": c.variant_id,
                "recipe": c.recipe,
                "cacheHit": c.cache_hit,
                "passes": [asdict(r) for r in c.passes],
                "evaluation": _evaluation(c.evaluation, result.baseline),
                "accepted": c.accepted,
                "rejection": c.rejection,
                "lineage": asdict(c.lineage),
            }
            for c in result.candidates
        ],
        "chosen": result.chosen.name if result.chosen else None,
        "chosenVariantId": result.chosen.variant_id if result.chosen else None,
    }


def report_json(source: LoadedModel, result: ClassOptimization) -> bytes:
    """``report.json`` bytes."""
    return json.dumps(report_dict(source, result), indent=2, sort_keys=False).encode()


def report_png(result: ClassOptimization) -> bytes:
    """``report.png``: the metric against size and against p50 latency, for FP32 and every candidate."""
    figure, (by_size, by_latency) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110, sharey=True)
    points = [("FP32", result.baseline, True, False)] + [
        (c.name, c.evaluation, c.accepted, c is result.chosen) for c in result.candidates if c.evaluation
    ]
    unmeasured = [name for name, e, _, _ in points if e.latency.p50_ms is None]
    labels: dict[tuple[int, float, float], list[str]] = {}
    for name, evaluation, accepted, chosen in points:
        style = {
            "marker": "*" if chosen else ("o" if accepted else "x"),
            "s": 240 if chosen else 80,
            "color": "tab:green" if chosen else ("tab:blue" if accepted else "tab:red"),
        }
        value = evaluation.metric_value
        size = evaluation.size_bytes / 1024
        by_size.scatter(size, value, **style)
        # Candidates that land on the same spot share one label instead of printing over each other.
        labels.setdefault((0, round(size, 0), round(value, 4)), []).append(name)
        p50 = evaluation.latency.p50_ms
        if p50 is not None:
            by_latency.scatter(p50, value, **style)
            labels.setdefault((1, round(p50, 3), round(value, 4)), []).append(name)
    for (panel, x, y), names in labels.items():
        axes = by_size if panel == 0 else by_latency
        axes.annotate(", ".join(names), (x, y), fontsize=8, xytext=(6, 6), textcoords="offset points")
    by_size.set_xlabel("model size (KiB)")
    by_size.set_ylabel(result.baseline.metric)
    provider = result.execution_provider
    by_latency.set_xlabel(f"p50 latency, one sample (ms) on {provider}")
    if unmeasured:
        by_latency.set_title(f"not measured here: {', '.join(unmeasured)}", fontsize=8)
    for axes in (by_size, by_latency):
        axes.grid(alpha=0.3)
    figure.suptitle(
        f"{result.device_class}: green * chosen, blue o accepted, red x rejected "
        f"(budget: drop <= {result.max_accuracy_drop:g})"
    )
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
