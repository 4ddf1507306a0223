"""Build and measure candidate variants of a model for one device class, and choose the best.

For each candidate recipe (see :mod:`planner`) the passes run in order on a copy of the source;
a pass that does not apply is reported and skipped, a pass that fails is reported and the recipe
goes on without it. Every candidate is then measured against the FP32 source on evaluation data
that calibration and fine-tuning never saw; candidates over the accuracy budget, slower than FP32
on the class's execution provider, or too big for the class's memory are rejected with the reason.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.errors import ModelError, OptimizationError, PassNotApplicable
from edgefleet_core.optimize.data import Dataset, input_specs
from edgefleet_core.optimize.evaluate import Evaluation, Metric, ModelEvaluator
from edgefleet_core.optimize.lineage import Lineage, VariantCache, canonical_pass, lineage_for
from edgefleet_core.optimize.model_io import LoadedModel, parse_model, serialize
from edgefleet_core.optimize.passes.base import OptimizationPass, PassContext, Trainer
from edgefleet_core.optimize.passes.registry import create_pass
from edgefleet_core.optimize.planner import CandidateRecipe, auto_recipe, candidate_recipes, target_provider
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.recipe import MixedPrecisionOptions, PassOptions, PassSpec, Recipe

logger = logging.getLogger(__name__)

Objective = Literal["latency", "size", "balanced"]
SLOWER_TOLERANCE = 1.05
"""A candidate whose p50 exceeds FP32's by more than this factor is slower (5 % absorbs timer noise)."""
SLOWER_MIN_MS = 0.05
"""...and by more than this many milliseconds: smaller differences are not resolvable on a busy machine.

The operator builds several classes at once in a worker pool, where a model of a few microseconds
measured 0.010 ms for FP32 and 0.023 ms for its exact graph-optimized copy: noise, not a slower model.
"""
SYNTHETIC_SAMPLES = 64
MIN_SPLIT = 20
"""Data sets at least this large are split into calibration and evaluation halves."""


class Progress(Protocol):
    """Where the pipeline reports what it is doing (the CLI draws progress bars from it)."""

    def begin(self, label: str, total: int) -> None:
        """A stage with ``total`` steps starts."""

    def step(self, label: str, detail: str) -> None:
        """One step of the current stage is done."""


class _SilentProgress:
    def begin(self, label: str, total: int) -> None:
        del label, total

    def step(self, label: str, detail: str) -> None:
        del label, detail


@dataclass
class PassRecord:
    """What one pass did in one candidate."""

    type: str
    options: dict[str, Any]
    status: Literal["applied", "skipped", "failed"]
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Candidate:
    """One candidate variant: how it was built, what was measured, and the verdict."""

    name: str
    origin: str
    recipe: list[dict[str, Any]]
    lineage: Lineage
    passes: list[PassRecord]
    model: onnx.ModelProto
    evaluation: Evaluation | None = None
    accepted: bool = False
    rejection: str | None = None
    cache_hit: bool = False

    @property
    def variant_id(self) -> str:
        """Content-addressed id of the variant."""
        return self.lineage.variant_id


@dataclass
class EvaluationPlan:
    """Which samples calibrate/train and which judge, and whether they are real."""

    calibration: Dataset | None
    evaluation: Dataset
    synthetic: bool
    description: str


@dataclass
class ClassOptimization:
    """The outcome for one device class: the baseline, every candidate, and the chosen one."""

    device_class: str
    execution_provider: str
    objective: Objective
    max_accuracy_drop: float
    plan: EvaluationPlan
    baseline: Evaluation
    candidates: list[Candidate]
    chosen: Candidate | None


def split_data(data: Dataset | None, model: onnx.ModelProto, seed: int) -> EvaluationPlan:
    """Calibration and evaluation samples that do not overlap; synthetic inputs when there is no data."""
    if data is None:
        rng = np.random.default_rng(seed)
        arrays = {}
        for spec in input_specs(model):
            shape = tuple(SYNTHETIC_SAMPLES if i == 0 else (d or 1) for i, d in enumerate(spec.shape))
            if np.issubdtype(spec.dtype, np.floating):
                arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                arrays[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        return EvaluationPlan(
            None,
            Dataset(arrays),
            True,
            f"no data given: {SYNTHETIC_SAMPLES} random inputs; accuracy is agreement with FP32 on noise, "
            "and passes that need data were skipped",
        )
    if len(data) < MIN_SPLIT:
        return EvaluationPlan(
            data, data, False, f"{len(data)} samples used for both calibration and evaluation (too few to split)"
        )
    # A seeded permutation: a file sorted by class must not calibrate on some classes and judge on others.
    order = np.random.default_rng(seed).permutation(len(data))
    half = len(data) // 2

    def part(indices: npt.NDArray[np.intp]) -> Dataset:
        labels = None if data.labels is None else data.labels[indices]
        return Dataset({k: v[indices] for k, v in data.inputs.items()}, labels)

    calibration, evaluation = part(np.sort(order[:half])), part(np.sort(order[half:]))
    return EvaluationPlan(
        calibration,
        evaluation,
        False,
        f"{half} samples calibrate and train, the other {len(data) - half} evaluate",
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _run_passes(
    passes: tuple[PassSpec, ...],
    source: onnx.ModelProto,
    ctx: PassContext,
    pass_factory: Callable[[PassSpec], OptimizationPass[PassOptions]],
    progress: Progress,
) -> tuple[onnx.ModelProto, list[PassRecord]]:
    model = _copy(source)
    records: list[PassRecord] = []
    for spec in passes:
        record = PassRecord(spec.type, canonical_pass(spec)["options"], "applied")
        started = time.perf_counter()
        try:
            result = pass_factory(spec).apply(model, ctx)
            # A pass's output is untrusted until checked: it must be a valid, loadable model.
            checked = parse_model(serialize(result.model), f"output of {spec.type}")
        except PassNotApplicable as exc:
            record.status, record.reason = "skipped", exc.reason
        except Exception as exc:  # noqa: BLE001 — isolation boundary: one pass breaking on an odd model must not sink the recipe
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
            logger.debug("pass %s failed:\n%s", spec.type, traceback.format_exc())
        else:
            model = checked
            record.notes, record.metrics = result.notes, result.metrics
        record.seconds = round(time.perf_counter() - started, 3)
        records.append(record)
        progress.step("passes", f"{spec.type}: {record.status}")
    return model, records


def _verdict(candidate: Candidate, baseline: Evaluation, max_drop: float, memory_bytes: int | None) -> None:
    evaluation = candidate.evaluation
    if evaluation is None:
        candidate.accepted = False
        return  # the rejection (why it could not be evaluated) is already set
    drop = baseline.score - evaluation.score
    reasons = []
    if drop > max_drop + 1e-12:
        reasons.append(f"{evaluation.metric} drops by {drop:.4f}, over the budget of {max_drop:.4f}")
    ours, theirs = evaluation.latency.p50_ms, baseline.latency.p50_ms
    if ours is not None and theirs is not None and ours > theirs * SLOWER_TOLERANCE and ours - theirs > SLOWER_MIN_MS:
        reasons.append(
            f"slower than FP32 on {evaluation.latency.execution_provider}: p50 {ours:.3f} ms vs {theirs:.3f} ms"
        )
    if memory_bytes is not None:
        # Peak RSS of loading and running it already includes the weights; the file size is the floor.
        needed = max(evaluation.size_bytes, evaluation.peak_memory_bytes or 0)
        if needed > memory_bytes:
            reasons.append(f"needs about {needed} bytes of memory; the class has {memory_bytes}")
    failed = [r.type for r in candidate.passes if r.status == "failed"]
    if failed:
        reasons.append(f"pass failed: {', '.join(failed)}")
    candidate.accepted = not reasons
    candidate.rejection = "; ".join(reasons) or None


def _choose(candidates: list[Candidate], baseline: Evaluation, objective: Objective) -> Candidate | None:
    accepted = [c for c in candidates if c.accepted and c.evaluation is not None]
    if not accepted:
        return None
    base_p50 = baseline.latency.p50_ms

    def key(candidate: Candidate) -> tuple[float, float]:
        e = candidate.evaluation
        assert e is not None
        p50 = e.latency.p50_ms if e.latency.p50_ms is not None else float("inf")
        if objective == "size":
            return (e.size_bytes, p50)
        if objective == "latency":
            # Without a measurement on the class's EP, size decides.
            return (p50, e.size_bytes) if base_p50 is not None else (e.size_bytes, 0.0)
        size_ratio = e.size_bytes / max(baseline.size_bytes, 1)
        latency_ratio = p50 / base_p50 if base_p50 and p50 != float("inf") else 1.0
        return (size_ratio + latency_ratio, -e.score)

    return min(accepted, key=key)


def _cached_records(raw: list[dict[str, Any]]) -> list[PassRecord] | None:
    try:
        return [PassRecord(**r) for r in raw]
    except (TypeError, ValueError):
        return None  # written by another version: rebuild


def _build(
    planned: CandidateRecipe,
    source: LoadedModel,
    ctx: PassContext,
    target: dict[str, Any],
    data_digest: str | None,
    seed: int,
    cache: VariantCache | None,
    factory: Callable[[PassSpec], OptimizationPass[PassOptions]],
    report: Progress,
) -> Candidate:
    lineage = lineage_for(source.content_digest, planned.passes, data_digest, seed, target)
    cached = cache.get(lineage.variant_id) if cache is not None else None
    records = _cached_records(cached[1]) if cached is not None else None
    if cached is not None and records is not None:
        model = cached[0]
        for spec in planned.passes:
            report.step("passes", f"{spec.type}: cached")
    else:
        cached = None
        model, records = _run_passes(planned.passes, source.model, ctx, factory, report)
        if cache is not None and not any(r.status == "failed" for r in records):
            try:
                cache.put(lineage.variant_id, model, [vars(r) for r in records])
            except OSError as exc:  # the cache only saves time: never fail a run over it
                logger.warning("could not cache variant %s: %s", lineage.variant_id, exc)
    return Candidate(
        planned.name,
        planned.origin,
        [canonical_pass(p) for p in planned.passes],
        lineage,
        records,
        model,
        cache_hit=cached is not None,
    )


def _sensitivity_evaluator(
    model: onnx.ModelProto,
    calibration: Dataset | None,
    provider: str,
    metric: Metric,
    recipes: list[CandidateRecipe],
) -> ModelEvaluator | None:
    """The evaluator passes search with (mixed precision), on at most the samples they ask for."""
    if calibration is None:
        return None
    wanted = [
        p.options.sensitivity_samples for r in recipes for p in r.passes if isinstance(p.options, MixedPrecisionOptions)
    ]
    samples = calibration.take(max(wanted)) if wanted else calibration
    return ModelEvaluator(model, samples, provider, metric, latency_rounds=2)


def optimize_for_class(
    source: LoadedModel,
    device_class: DeviceClass,
    *,
    recipe: Recipe | None = None,
    recipe_origin: str = "given",
    data: Dataset | None = None,
    data_digest: str | None = None,
    max_accuracy_drop: float = 0.01,
    metric: Metric | None = None,
    objective: Objective = "balanced",
    trainer: Trainer | None = None,
    cache: VariantCache | None = None,
    pass_factory: Callable[[PassSpec], OptimizationPass[PassOptions]] | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    latency_rounds: int = 5,
) -> ClassOptimization:
    """Build, measure and choose among candidate variants of ``source`` for ``device_class``."""
    factory = pass_factory or create_pass
    report = progress or _SilentProgress()
    spec = device_class.spec
    provider = target_provider(spec)
    if recipe is None:
        if spec.default_recipe is not None:
            recipe, recipe_origin = spec.default_recipe, f"default recipe of DeviceClass {device_class.metadata.name}"
        else:
            recipe, recipe_origin = auto_recipe(spec), f"auto for {provider} with {', '.join(spec.precisions)}"
    plan = split_data(data, source.model, seed)
    evaluator = ModelEvaluator(source.model, plan.evaluation, provider, metric, latency_rounds=latency_rounds)
    recipes: list[CandidateRecipe] = candidate_recipes(
        recipe, recipe_origin, trainer_available=trainer is not None, has_data=plan.calibration is not None
    )
    ctx = PassContext(
        execution_provider=provider,
        precisions=frozenset(spec.precisions),
        source=source.model,
        data=plan.calibration,
        trainer=trainer,
        evaluator=_sensitivity_evaluator(source.model, plan.calibration, provider, evaluator.metric, recipes),
        max_accuracy_drop=max_accuracy_drop,
        seed=seed,
    )
    target = {
        "executionProvider": provider,
        "precisions": sorted(spec.precisions),
        "maxAccuracyDrop": max_accuracy_drop,
        "metric": evaluator.metric,
    }
    report.begin("passes", sum(len(r.passes) for r in recipes))
    candidates = [
        _build(planned, source, ctx, target, data_digest, seed, cache, factory, report) for planned in recipes
    ]
    report.begin("evaluation", 1)
    results = evaluator.evaluate_all({"FP32": source.model, **{c.name: c.model for c in candidates}})
    report.step("evaluation", f"{len(candidates)} candidates and FP32 measured")
    baseline = results["FP32"]
    if isinstance(baseline, ModelError):
        raise ModelError(str(source.path), baseline.problem)
    memory = spec.memory_bytes
    for candidate in candidates:
        outcome = results[candidate.name]
        if isinstance(outcome, ModelError):
            candidate.rejection = f"cannot be evaluated: {outcome.problem}"
        else:
            candidate.evaluation = outcome
        _verdict(candidate, baseline, max_accuracy_drop, memory)
    return ClassOptimization(
        device_class=device_class.metadata.name,
        execution_provider=provider,
        objective=objective,
        max_accuracy_drop=max_accuracy_drop,
        plan=plan,
        baseline=baseline,
        candidates=candidates,
        chosen=_choose(candidates, baseline, objective),
    )


def require_chosen(result: ClassOptimization) -> Candidate:
    """The chosen candidate, or :class:`OptimizationError` listing why each was rejected."""
    if result.chosen is None:
        reasons = "; ".join(f"{c.name}: {c.rejection}" for c in result.candidates)
        raise OptimizationError(f"no candidate for device class {result.device_class} was accepted ({reasons})")
    return result.chosen
