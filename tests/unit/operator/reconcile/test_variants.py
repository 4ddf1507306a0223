"""Building variants with the real pipeline, planner and self-test, publishing them, and their status entries."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet_core.bundle.distribution import BundleRef
from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.bundle.selftest import check_outputs
from edgefleet_core.optimize.lineage import VariantCache
from edgefleet_core.optimize.model_io import parse_model
from edgefleet_core.optimize.runtime import run, session
from edgefleet_core.partition.plan import PartitionPlan
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_operator.reconcile import (
    BuiltVariant,
    SourceResolver,
    SpecError,
    build_key,
    build_variant,
    variant_status,
)
from tests.support.tiny_models import tiny_cnn
from tests.unit.operator.reconcile.conftest import (
    CPU,
    MODEL,
    NAMESPACE,
    NPU,
    StagedFile,
    device_class,
    edge_model,
    model_bytes,
    stage,
)

RUNS = 3
"""Partition profiling runs: enough to price a cut, few enough to stay fast."""
LOSSY = {"passes": [{"type": "WeightClustering", "weightClustering": {"bits": 1}}]}
"""Two weight values per tensor: far over any accuracy budget on the tiny CNN."""


def _build(
    model: EdgeModel,
    cls: DeviceClass,
    resolver: SourceResolver,
    *,
    cache: VariantCache | None = None,
) -> BuiltVariant:
    source = resolver.load_model(model.spec.source)
    data = resolver.load_evaluation_data(model.spec.accuracy, source)
    return build_variant(model, cls, source, data, cache=cache, trainer=None, partition_runs=RUNS)


def _spec_error(model: EdgeModel, cls: DeviceClass, resolver: SourceResolver) -> SpecError:
    with pytest.raises(SpecError) as caught:
        _build(model, cls, resolver)
    return caught.value


def _outputs(files: dict[str, bytes], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = dict(feed)
    for name in ("model.onnx", "head.onnx", "tail.onnx"):
        if name in files:
            model = parse_model(files[name], name)
            runner = session(model)
            names = [o.name for o in model.graph.output]
            wanted = {i.name for i in runner.get_inputs()}
            values.update(zip(names, run(runner, names, {k: v for k, v in values.items() if k in wanted}), strict=True))
    return values


def test_a_cpu_class_gets_the_whole_optimized_model(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver
) -> None:
    built = _build(edge_model(source_file), cpu_class, resolver)
    assert set(built.files) == {"model.onnx"}
    parse_model(built.files["model.onnx"], "built")
    assert re.fullmatch(r"[a-f0-9]{64}", built.variant_id)
    assert built.lineage["appliedPasses"] == ["GraphOptimization"]
    assert built.lineage["target"]["executionProvider"] == "CPUExecutionProvider"
    assert [p["type"] for p in built.recipe] == ["GraphOptimization"]
    assert {"accuracy", "accuracyDelta", "sizeBytes"} <= set(built.metrics)
    assert built.metrics["accuracyDelta"] == 0.0  # graph optimization is exact
    assert built.partition_plan is None
    assert built.self_test is not None
    feed = built.self_test.input_arrays()
    assert check_outputs(built.self_test, _outputs(built.files, feed)) is None
    summary = built.summary
    assert (summary["deviceClass"], summary["candidate"], summary["partition"]) == (CPU, "recipe", None)
    assert summary["origin"] == "spec.optimization.recipe of EdgeModel factory/digits"


def test_evaluation_data_with_labels_measures_top1(
    source_file: StagedFile, eval_data: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver
) -> None:
    model = edge_model(source_file, accuracy={"evaluationData": {"uri": eval_data.uri, "sha256": eval_data.sha256}})
    built = _build(model, cpu_class, resolver)
    assert built.summary["metric"] == "top1"
    assert built.metrics["accuracy"] == 1.0  # the labels are the FP32 model's own predictions
    assert built.lineage["data_digest"] == eval_data.sha256


def test_a_manual_cut_ships_head_and_tail_with_the_plan(
    source_file: StagedFile, npu_class: DeviceClass, resolver: SourceResolver
) -> None:
    model = edge_model(source_file, targets={"deviceClasses": [NPU]}, partition={"policy": "manual", "cut": ["g1"]})
    built = _build(model, npu_class, resolver)
    assert set(built.files) == {"head.onnx", "tail.onnx"}
    assert built.partition_plan is not None
    plan = PartitionPlan.model_validate(built.partition_plan)
    assert plan.chosen.tensors == ["g1"]
    assert plan.manual_cut == ["g1"]
    assert built.lineage["partitionPlanId"] == plan.plan_id
    assert built.summary["partition"]["cut"] == ["g1"]
    # The self-test runs head then tail, and they give what the whole optimized model gives.
    assert built.self_test is not None
    feed = built.self_test.input_arrays()
    assert check_outputs(built.self_test, _outputs(built.files, feed)) is None
    whole = _build(edge_model(source_file, partition={"policy": "off"}), npu_class, resolver)
    np.testing.assert_allclose(
        _outputs(built.files, feed)["logits"], _outputs(whole.files, feed)["logits"], rtol=1e-5, atol=1e-6
    )


def test_auto_partition_records_the_planners_decision(
    source_file: StagedFile, npu_class: DeviceClass, resolver: SourceResolver
) -> None:
    model = edge_model(source_file, targets={"deviceClasses": [NPU]}, partition={"objective": "throughput"})
    built = _build(model, npu_class, resolver)
    decision = built.summary["partition"]
    assert decision["policy"] == "throughput"
    # A plan may say "don't split": then the whole model ships, without a plan.
    if decision["cut"]:
        assert set(built.files) == {"head.onnx", "tail.onnx"}
        assert built.partition_plan is not None
    else:
        assert set(built.files) == {"model.onnx"}
        assert built.partition_plan is None


def test_no_partition_when_off_or_without_a_link(source_file: StagedFile, resolver: SourceResolver) -> None:
    no_link = device_class(NPU, accelerator=True, link=False)
    for model, cls in (
        (edge_model(source_file, partition={"policy": "off"}), device_class(NPU, accelerator=True)),
        (edge_model(source_file), no_link),
    ):
        built = _build(model, cls, resolver)
        assert set(built.files) == {"model.onnx"}
        assert built.summary["partition"] is None
    error = _spec_error(edge_model(source_file, partition={"policy": "manual", "cut": ["g1"]}), no_link, resolver)
    assert error.field == "spec.partition.policy"
    assert "spec.accelerator.link" in error.message


def test_auto_partition_the_planner_cannot_do_ships_the_whole_model(tmp_path: Path, npu_class: DeviceClass) -> None:
    # Height and width left open: the planner cannot make example inputs to time cuts with.
    open_dims = tiny_cnn()
    dims = open_dims.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    staged = stage(tmp_path / "open.onnx", model_bytes(open_dims))
    resolver = SourceResolver()
    built = _build(edge_model(staged, targets={"deviceClasses": [NPU]}), npu_class, resolver)
    assert set(built.files) == {"model.onnx"}
    assert built.summary["partition"]["skipped"].startswith("the planner cannot partition this model: ")
    manual = edge_model(staged, partition={"policy": "manual", "cut": ["g1"]})
    assert _spec_error(manual, npu_class, resolver).field == "spec.partition.cut"


def test_a_manual_cut_that_does_not_exist_names_the_cut(
    source_file: StagedFile, npu_class: DeviceClass, resolver: SourceResolver
) -> None:
    model = edge_model(source_file, partition={"policy": "manual", "cut": ["no-such-tensor"]})
    error = _spec_error(model, npu_class, resolver)
    assert error.field == "spec.partition.cut"
    assert error.message.startswith(f"cannot cut the model for DeviceClass {NPU}")


def test_an_unreachable_budget_names_max_drop(source_file: StagedFile, resolver: SourceResolver) -> None:
    # Too little memory rejects the exact fallback too, so nothing is left once the budget rejects the recipe.
    tiny = device_class(CPU, memory="1Ki")
    model = edge_model(source_file, optimization={"recipe": LOSSY}, accuracy={"maxDrop": 0.0})
    error = _spec_error(model, tiny, resolver)
    assert error.field == "spec.accuracy.maxDrop"
    assert error.message.startswith(f"no candidate meets the budget for DeviceClass {CPU}: recipe: ")
    assert "over the budget" in error.message


def test_candidates_rejected_for_other_reasons_name_the_recipe(
    source_file: StagedFile, resolver: SourceResolver
) -> None:
    tiny = device_class(CPU, memory="1Ki")
    assert _spec_error(edge_model(source_file), tiny, resolver).field == "spec.optimization.recipe"
    basic = {"passes": [{"type": "GraphOptimization", "graphOptimization": {"level": "basic"}}]}
    override = {"recipe": LOSSY, "overrides": [{"deviceClass": CPU, "recipe": basic}]}
    assert _spec_error(edge_model(source_file, optimization=override), tiny, resolver).field == (
        "spec.optimization.overrides[0].recipe"
    )
    # No recipe in the model: the class's default (or auto) recipe ran; the model's optimization is what to set.
    bare = edge_model(source_file, optimization={"objective": "size"})
    assert _spec_error(bare, tiny, resolver).field == "spec.optimization"


def test_a_metric_the_data_cannot_measure(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver
) -> None:
    error = _spec_error(edge_model(source_file, accuracy={"metric": "top1"}), cpu_class, resolver)
    assert error.field == "spec.accuracy"
    assert "top1 needs integer class labels" in error.message


def test_the_override_for_the_class_is_used(source_file: StagedFile, resolver: SourceResolver) -> None:
    model = edge_model(
        source_file,
        targets={"deviceClasses": [CPU, "other-cpu"]},
        optimization={
            "recipe": LOSSY,
            "overrides": [{"deviceClass": "other-cpu", "recipe": {"passes": [{"type": "GraphOptimization"}]}}],
        },
    )
    built = _build(model, device_class("other-cpu"), resolver)
    # The override is the exact floor itself, so it is the only candidate.
    assert [c["origin"] for c in built.summary["candidates"]] == [
        "spec.optimization.overrides[0].recipe of EdgeModel factory/digits"
    ]
    lossy = _build(model, device_class(CPU), resolver)
    assert lossy.summary["candidates"][0]["origin"] == "spec.optimization.recipe of EdgeModel factory/digits"
    assert lossy.summary["candidate"] == "fp32-optimized"  # the lossy recipe lost to the exact floor
    assert lossy.summary["candidates"][0]["rejection"].startswith("top1Agreement drops by")


def test_the_variant_cache_is_used(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver, tmp_path: Path
) -> None:
    cache = VariantCache(tmp_path / "cache")
    first = _build(edge_model(source_file), cpu_class, resolver, cache=cache)
    second = _build(edge_model(source_file), cpu_class, resolver, cache=cache)
    assert (first.summary["cacheHit"], second.summary["cacheHit"]) == (False, True)
    assert second.variant_id == first.variant_id
    assert second.files == first.files


# -- publishing and status --------------------------------------------------------------------------------


def _publish(publisher: Publisher, built: BuiltVariant, cls: str, version: str, key: str | None) -> Any:
    return publisher.publish(
        BundleRef(NAMESPACE, MODEL, cls, version),
        built.files,
        build_key=key,
        variant_id=built.variant_id,
        lineage=built.lineage,
        recipe=built.recipe,
        metrics=built.metrics,
        partition_plan=built.partition_plan,
        self_test=built.self_test,
    )


def test_status_of_a_published_variant_is_the_same_built_or_adopted(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver, publisher: Publisher
) -> None:
    model = edge_model(source_file)
    built = _build(model, cpu_class, resolver)
    key = build_key(model, cpu_class, data_sha256=None)
    published = _publish(publisher, built, CPU, publisher.next_version(NAMESPACE, MODEL), key)
    assert not published.adopted
    status = variant_status(published, built)
    manifest = published.manifest
    assert (status.device_class, status.version) == (CPU, "1")
    assert status.digest == f"sha256:{hashlib.sha256(manifest.canonical_json()).hexdigest()}"
    assert status.size_bytes == len(built.files["model.onnx"])
    assert status.transport_size_bytes is not None
    assert status.compression_ratio == pytest.approx(status.size_bytes / status.transport_size_bytes)
    assert status.execution_provider == "CPUExecutionProvider"
    assert status.passes == ["GraphOptimization"]
    assert status.accuracy == built.metrics["accuracy"]
    assert status.accuracy_delta == 0.0
    assert status.partition is None
    assert status.bundle == f"{CPU}/{NAMESPACE}/{MODEL}/1/manifest.json"
    if "p50Ms" in built.metrics:
        assert status.latency_ms is not None
        assert status.latency_ms.p50 == built.metrics["p50Ms"]
    # After a restart the same key finds the publication: same status, nothing written.
    adopted = publisher.find_build(BundleRef(NAMESPACE, MODEL, CPU), key)
    assert adopted is not None
    assert adopted.adopted
    assert variant_status(adopted) == status
    assert variant_status(adopted, adopted.manifest) == status
    again = _publish(publisher, _build(model, cpu_class, resolver), CPU, "2", key)
    assert (again.adopted, again.ref.version) == (True, "1")


def test_status_of_a_partitioned_variant(
    source_file: StagedFile, npu_class: DeviceClass, resolver: SourceResolver, publisher: Publisher
) -> None:
    model = edge_model(source_file, targets={"deviceClasses": [NPU]}, partition={"policy": "manual", "cut": ["g1"]})
    built = _build(model, npu_class, resolver)
    status = variant_status(_publish(publisher, built, NPU, "1", "k" * 64), built)
    assert status.partition is not None
    assert status.partition.cut == ["g1"]
    assert (status.partition.head_execution_provider, status.partition.tail_execution_provider) == (
        "CPUExecutionProvider",
        "OpenVINOExecutionProvider",
    )
    assert status.partition.predicted_latency_ms == built.summary["partition"]["predictedLatencyMs"]
    assert status.execution_provider == "OpenVINOExecutionProvider"
    assert status.size_bytes == len(built.files["head.onnx"]) + len(built.files["tail.onnx"])


def test_status_refuses_a_build_of_another_variant(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver, publisher: Publisher
) -> None:
    built = _build(edge_model(source_file), cpu_class, resolver)
    published = _publish(publisher, built, CPU, "1", None)
    source = resolver.load_model(edge_model(source_file).spec.source)
    other = build_variant(edge_model(source_file), cpu_class, source, None, cache=None, trainer=None, seed=1)
    assert other.variant_id != built.variant_id
    with pytest.raises(ValueError, match="is not the one published"):
        variant_status(published, other)


def test_status_of_a_hand_published_variant_lists_the_recipe(
    source_file: StagedFile, cpu_class: DeviceClass, resolver: SourceResolver, publisher: Publisher
) -> None:
    built = _build(edge_model(source_file), cpu_class, resolver)
    by_hand = BuiltVariant(
        files=built.files,
        variant_id=built.variant_id,
        lineage={"files": {"model.onnx": "0" * 64}},
        recipe=built.recipe,
        metrics={},
        partition_plan=None,
        self_test=None,
        summary={},
    )
    status = variant_status(_publish(publisher, by_hand, CPU, "1.0.0", None))
    assert status.passes == ["GraphOptimization"]
    assert (status.execution_provider, status.latency_ms, status.accuracy) == (None, None, None)
