"""Building one (EdgeModel, DeviceClass) variant, and the status entry of a published one.

:func:`build_variant` does in one call what ``edgefleet optimize``, ``edgefleet partition plan``
and ``edgefleet publish`` do one after another on the command line, through the same library
functions: the pipeline chooses the best candidate within the accuracy budget, the planner
decides whether (and where) to cut it for the class's accelerator, and the bundle's self-test is
computed from the exact bytes that will be signed. Publishing is the caller's (through
:class:`~edgefleet_core.bundle.publisher.Publisher`, which adopts an earlier build of the same key).

:func:`variant_status` reads everything from the published manifest, so a variant that was just
built and one adopted after a restart give the same status entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

import onnx
from pydantic import ValidationError

from edgefleet_core.bundle.distribution import MANIFEST
from edgefleet_core.bundle.manifest import BundleManifest
from edgefleet_core.bundle.publisher import PublishedVariant
from edgefleet_core.bundle.selftest import SelfTest, make_self_test
from edgefleet_core.errors import BundleError, DataError, ModelError, OptimizationError
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.evaluate import Evaluation
from edgefleet_core.optimize.lineage import VariantCache
from edgefleet_core.optimize.model_io import LoadedModel, serialize
from edgefleet_core.optimize.passes.base import Trainer
from edgefleet_core.optimize.pipeline import Candidate, ClassOptimization, Progress, optimize_for_class, require_chosen
from edgefleet_core.partition.cuts import PartitionError, verify_split
from edgefleet_core.partition.plan import PartitionPlan, check_head_tail, plan_partition, split_for
from edgefleet_core.partition.profile import DEFAULT_RUNS, DEFAULT_WARMUP, example_inputs
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import (
    AccuracyBudget,
    EdgeModel,
    LatencySummary,
    Optimization,
    PartitionPolicy,
    Variant,
    VariantPartition,
)
from edgefleet_operator.reconcile.build_key import effective_partition, effective_recipe, recipe_field
from edgefleet_operator.reconcile.errors import SpecError

logger = logging.getLogger(__name__)

APPLIED_PASSES: Final = "appliedPasses"
"""Lineage field: the pass types that changed the model (a recipe's pass may be skipped or fail)."""
PARTITION_PLAN_ID: Final = "partitionPlanId"
"""Lineage field: the id of the partition plan a head and tail were cut by."""
BUILD_SECONDS: Final = "buildSeconds"
"""Summary field: seconds the whole build took (pipeline, partitioning, self-test), wherever it ran."""


@dataclass(frozen=True)
class BuiltVariant:
    """A variant ready to publish: the files and everything its manifest records."""

    files: dict[str, bytes]
    """``model.onnx``, or ``head.onnx`` and ``tail.onnx`` when the plan splits the model."""
    variant_id: str
    """Content address of the optimized model (source digest, canonical passes, data, seed, target, tools)."""
    lineage: dict[str, Any]
    recipe: list[Any]
    """The chosen candidate's passes, canonical (options defaulted)."""
    metrics: dict[str, float]
    """As ``edgefleet publish --report`` records them: accuracy, accuracyDelta, sizeBytes, p50Ms, p95Ms."""
    partition_plan: dict[str, Any] | None
    """The plan (canonical JSON form) when the files are a head and a tail; ``None`` for a whole model."""
    self_test: SelfTest | None
    """Golden inputs and outputs for the device; ``None`` when they do not fit in a manifest (see ``summary``)."""
    summary: dict[str, Any]
    """What happened, for events and logs (JSON-ready): the chosen candidate, every candidate with its
    verdict, the data used, the partition decision, the self-test."""


def build_variant(
    model: EdgeModel,
    device_class: DeviceClass,
    source: LoadedModel,
    data: tuple[Dataset, str] | None,
    *,
    cache: VariantCache | None,
    trainer: Trainer | None,
    seed: int = 0,
    latency_rounds: int = 5,
    partition_runs: int = DEFAULT_RUNS,
    progress: Progress | None = None,
) -> BuiltVariant:
    """Optimize ``source`` for ``device_class`` per ``model``'s spec, partition it if the spec and class say so.

    ``data`` is the evaluation data and its digest (:meth:`~.sources.SourceResolver.load_evaluation_data`).
    Raises :class:`~.errors.SpecError` when the spec cannot be met (no candidate within the budget,
    a manual cut that does not exist, a metric the data cannot measure).
    """
    started = time.perf_counter()
    spec = model.spec
    name = device_class.metadata.name
    result = _optimize(
        model,
        device_class,
        source,
        data,
        cache=cache,
        trainer=trainer,
        seed=seed,
        latency_rounds=latency_rounds,
        progress=progress,
    )
    chosen = _require_chosen(model, name, result)
    evaluation = chosen.evaluation
    assert evaluation is not None  # an accepted candidate was evaluated
    lineage: dict[str, Any] = asdict(chosen.lineage)
    lineage[APPLIED_PASSES] = [r.type for r in chosen.passes if r.status == "applied"]
    files = {"model.onnx": serialize(chosen.model)}
    plan_document: dict[str, Any] | None = None
    partition_summary: dict[str, Any] | None = None
    policy = effective_partition(spec, device_class)
    if policy is not None:
        outcome = _partition(chosen.model, device_class, policy, runs=partition_runs)
        if isinstance(outcome, str):
            partition_summary = {"skipped": outcome}
        else:
            plan, head_tail = outcome
            partition_summary = _plan_summary(plan)
            if head_tail is not None:
                files = head_tail
                plan_document = json.loads(plan.canonical_json())
                lineage[PARTITION_PLAN_ID] = plan.plan_id
    self_test, self_test_note = _self_test(files, seed)
    metrics = {
        "accuracy": evaluation.metric_value,
        "accuracyDelta": evaluation.score - result.baseline.score,
        "sizeBytes": float(evaluation.size_bytes),
    }
    if evaluation.latency.p50_ms is not None:
        metrics["p50Ms"] = evaluation.latency.p50_ms
    if evaluation.latency.p95_ms is not None:
        metrics["p95Ms"] = evaluation.latency.p95_ms
    summary = {
        "deviceClass": name,
        "executionProvider": result.execution_provider,
        "candidate": chosen.name,
        "origin": chosen.origin,
        "cacheHit": chosen.cache_hit,
        "metric": evaluation.metric,
        "data": result.plan.description,
        "passes": [
            {"type": r.type, "status": r.status, "reason": r.reason, "seconds": r.seconds} for r in chosen.passes
        ],
        # Every candidate's passes with their times: the operator's per-pass metrics come from here,
        # so a build that ran in a Job reports them as one that ran in the operator does.
        # The figures behind the choice, so a report can plot the trade-off (the FP32 model too).
        "baseline": _figures(result.baseline),
        "candidates": [
            {
                "name": c.name,
                "origin": c.origin,
                "accepted": c.accepted,
                "rejection": c.rejection,
                "cacheHit": c.cache_hit,
                "passes": [{"type": r.type, "status": r.status, "seconds": r.seconds} for r in c.passes],
                **(_figures(c.evaluation) if c.evaluation is not None else {}),
            }
            for c in result.candidates
        ],
        "partition": partition_summary,
        "selfTest": self_test_note,
    }
    summary[BUILD_SECONDS] = round(time.perf_counter() - started, 3)
    return BuiltVariant(
        files=files,
        variant_id=chosen.variant_id,
        lineage=lineage,
        recipe=list(chosen.recipe),
        metrics=metrics,
        partition_plan=plan_document,
        self_test=self_test,
        summary=summary,
    )


def _optimize(
    model: EdgeModel,
    device_class: DeviceClass,
    source: LoadedModel,
    data: tuple[Dataset, str] | None,
    *,
    cache: VariantCache | None,
    trainer: Trainer | None,
    seed: int,
    latency_rounds: int,
    progress: Progress | None,
) -> ClassOptimization:
    spec = model.spec
    name = device_class.metadata.name
    accuracy = spec.accuracy or AccuracyBudget()
    where = recipe_field(spec, name)
    try:
        return optimize_for_class(
            source,
            device_class,
            recipe=effective_recipe(spec, name),
            recipe_origin=f"{where} of EdgeModel {_model_name(model)}" if where else "given",
            data=data[0] if data is not None else None,
            data_digest=data[1] if data is not None else None,
            max_accuracy_drop=accuracy.max_drop,
            metric=accuracy.metric,
            objective=(spec.optimization or Optimization()).objective,
            trainer=trainer,
            cache=cache,
            progress=progress,
            seed=seed,
            latency_rounds=latency_rounds,
        )
    except DataError as exc:  # a metric the data cannot measure, a batch size the data does not fit
        raise SpecError("spec.accuracy", f"cannot evaluate for DeviceClass {name}: {exc.problem}") from None
    except ModelError as exc:  # the FP32 source itself does not run
        raise SpecError("spec.source.uri", f"the model cannot be run for DeviceClass {name}: {exc.problem}") from None


def _require_chosen(model: EdgeModel, device_class: str, result: ClassOptimization) -> Candidate:
    """The chosen candidate; else a :class:`SpecError` at the accuracy budget or at the recipe.

    The budget is named when it rejected any candidate (loosening it is one way out); otherwise every
    candidate met the budget and lost for another reason (slower than FP32, too big for the class, a
    pass failed), and the recipe is what to change.
    """
    try:
        return require_chosen(result)
    except OptimizationError:
        pass
    reasons = "; ".join(f"{c.name}: {c.rejection}" for c in result.candidates)
    over_budget = any(
        c.evaluation is not None and result.baseline.score - c.evaluation.score > result.max_accuracy_drop
        for c in result.candidates
    )
    if over_budget:
        raise SpecError(
            "spec.accuracy.maxDrop", f"no candidate meets the budget for DeviceClass {device_class}: {reasons}"
        )
    where = recipe_field(model.spec, device_class) or "spec.optimization"
    raise SpecError(where, f"no candidate for DeviceClass {device_class} was accepted: {reasons}")


def _partition(
    model: onnx.ModelProto, device_class: DeviceClass, policy: PartitionPolicy, *, runs: int
) -> tuple[PartitionPlan, dict[str, bytes] | None] | str:
    """The plan and, when it splits, ``head.onnx``/``tail.onnx`` checked bit for bit against the whole model.

    With ``auto`` a model the planner cannot handle is shipped whole (the reason is returned); with
    ``manual`` the user asked for that cut, so it is a :class:`SpecError`.
    """
    name = device_class.metadata.name
    manual = policy.policy == "manual"
    accelerator = device_class.spec.accelerator
    if manual and (accelerator is None or accelerator.link is None):
        raise SpecError(
            "spec.partition.policy",
            f"a manual cut needs DeviceClass {name} to describe its accelerator's link (spec.accelerator.link)",
        )
    try:
        inputs = example_inputs(model)
        plan = plan_partition(
            model,
            device_class,
            policy=policy.objective,
            inputs=inputs,
            runs=runs,
            warmup=min(DEFAULT_WARMUP, runs),
            manual_cut=policy.cut if manual else None,
        )
        if not plan.chosen.is_split:
            return plan, None
        split = split_for(model, plan)
        verify_split(model, split, inputs)  # never ship a head and tail that disagree with the whole model
        check_head_tail(plan, split.head, split.tail)
    except (PartitionError, ModelError) as exc:
        if manual:
            raise SpecError("spec.partition.cut", f"cannot cut the model for DeviceClass {name}: {exc}") from None
        logger.warning("partitioning for DeviceClass %s failed, shipping the whole model: %s", name, exc)
        return f"the planner cannot partition this model: {exc}"
    return plan, {"head.onnx": serialize(split.head), "tail.onnx": serialize(split.tail)}


def _figures(evaluation: Evaluation) -> dict[str, float | None]:
    """Size, metric and p50 of one evaluated model (``p50Ms`` ``None`` where not measured here)."""
    return {
        "sizeBytes": float(evaluation.size_bytes),
        "accuracy": evaluation.metric_value,
        "p50Ms": evaluation.latency.p50_ms,
    }


def _plan_summary(plan: PartitionPlan) -> dict[str, Any]:
    chosen = plan.chosen
    return {
        "planId": plan.plan_id,
        "policy": plan.policy,
        "chosen": chosen.label,
        "cut": chosen.tensors,
        "predictedLatencyMs": chosen.latency_ms,
        "tailMeasuredOn": plan.tail_measured_on,
    }


def _self_test(files: dict[str, bytes], seed: int) -> tuple[SelfTest | None, str]:
    """Golden data from generated inputs (evaluation data never leaves for the fleet), and a note on it."""
    try:
        test = make_self_test(files, seed=seed)
    except BundleError as exc:
        # Typically inputs too large for the manifest's 64 KiB: the device then only loads the model.
        logger.warning("publishing without a self-test: %s", exc)
        return None, f"none: {exc}"
    return test, f"{len(test.inputs)} inputs, {len(test.outputs)} outputs from generated inputs"


def _model_name(model: EdgeModel) -> str:
    return f"{model.metadata.namespace or 'default'}/{model.metadata.name}"


# -- status ------------------------------------------------------------------------------------


def variant_status(
    published: PublishedVariant, built_or_manifest: BuiltVariant | BundleManifest | None = None
) -> Variant:
    """The ``status.variants[]`` entry of a published variant, from its signed manifest alone.

    ``built_or_manifest``, when given, must be the same variant (same variant id): a check that
    the caller did not pair a build with another class's publication.
    """
    manifest = published.manifest
    if built_or_manifest is not None and built_or_manifest.variant_id != manifest.variant_id:
        raise ValueError(
            f"variant {built_or_manifest.variant_id} is not the one published as "
            f"{published.ref.device_class} {manifest.version} ({manifest.variant_id})"
        )
    size = sum(f.length for f in manifest.files)
    transport = sum(f.encoding.length for f in manifest.files)
    metrics = manifest.metrics
    p50, p95 = metrics.get("p50Ms"), metrics.get("p95Ms")
    return Variant(
        device_class=manifest.device_class,
        version=manifest.version,
        digest=f"sha256:{hashlib.sha256(manifest.canonical_json()).hexdigest()}",
        size_bytes=size,
        transport_size_bytes=transport,
        compression_ratio=size / transport if transport else None,
        execution_provider=_execution_provider(manifest),
        passes=_passes(manifest),
        latency_ms=LatencySummary(p50=p50, p95=p95) if p50 is not None or p95 is not None else None,
        accuracy=metrics.get("accuracy"),
        accuracy_delta=metrics.get("accuracyDelta"),
        partition=_variant_partition(manifest),
        bundle=f"{published.ref.prefix(manifest.version)}/{MANIFEST}",
    )


def _execution_provider(manifest: BundleManifest) -> str | None:
    target = manifest.lineage.get("target")
    provider = target.get("executionProvider") if isinstance(target, dict) else None
    return provider if isinstance(provider, str) else None


def _passes(manifest: BundleManifest) -> list[str]:
    applied = manifest.lineage.get(APPLIED_PASSES)
    if isinstance(applied, list):
        return [p for p in applied if isinstance(p, str)]
    # Published without the record (by hand, with `edgefleet publish`): the recipe's passes.
    return [str(p["type"]) for p in manifest.recipe if isinstance(p, dict) and "type" in p]


def _variant_partition(manifest: BundleManifest) -> VariantPartition | None:
    if manifest.partition_plan is None:
        return None
    try:
        plan = PartitionPlan.model_validate(manifest.partition_plan)
        chosen = plan.chosen
    except (ValidationError, PartitionError) as exc:
        # Signed and published, so it was valid once; a status must not fail over an older format.
        logger.warning("partition plan of %s %s not understood: %s", manifest.device_class, manifest.version, exc)
        return None
    return VariantPartition(
        cut=chosen.tensors,
        head_execution_provider=plan.head_execution_provider,
        tail_execution_provider=plan.tail_execution_provider,
        predicted_latency_ms=chosen.latency_ms,
    )
