"""The pipeline's own logic, with fake passes at our seam (real passes are tested on their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest

from edgefleet_core.errors import OptimizationError, PassNotApplicable
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.graph import get_array, set_array
from edgefleet_core.optimize.lineage import VariantCache, lineage_for
from edgefleet_core.optimize.model_io import LoadedModel, model_digest
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.optimize.pipeline import optimize_for_class, require_chosen, split_data
from edgefleet_core.resources import DeviceClass
from edgefleet_core.resources.recipe import GraphOptimizationOptions, PassOptions, PassSpec, Recipe
from tests.support.tiny_models import tiny_cnn, tiny_inputs

CALLS: list[str] = []


class _Fake(OptimizationPass[Any]):
    pass_type: ClassVar[str] = "Fake"
    options_type: ClassVar[type[PassOptions]] = GraphOptimizationOptions
    capability = PassCapability(summary="test double")

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        CALLS.append(self.behaviour)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if self.behaviour == "skip":
            raise PassNotApplicable("Fake", "not for this model")
        if self.behaviour == "crash":
            raise RuntimeError("kernel exploded")
        if self.behaviour == "invalid":
            out.graph.node[0].input[0] = "does-not-exist"
            return PassResult(out)
        if self.behaviour == "unrunnable":
            # Valid ONNX that ONNX Runtime cannot run: an op from a domain it does not know.
            out.graph.node[-1].domain = "com.example"
            out.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
            return PassResult(out)
        if self.behaviour == "ruin":
            # Scramble the classifier: accuracy collapses.
            fc = get_array(out, "fc_w").astype(np.float32)
            set_array(out, "fc_w", -fc)
            return PassResult(out, notes=["negated the classifier"])
        if self.behaviour == "shrink":
            fc = get_array(out, "fc_w").astype(np.float32)
            set_array(out, "fc_w", fc * np.float32(1.0001))
            return PassResult(out, notes=["harmless change"], metrics={"changed": 1.0})
        return PassResult(out)


def _factory(mapping: dict[str, str]) -> Any:
    def create(spec: PassSpec) -> OptimizationPass[Any]:
        return _Fake(mapping[spec.type])

    return create


def _device_class() -> DeviceClass:
    return DeviceClass.model_validate(
        {
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "DeviceClass",
            "metadata": {"name": "cpu"},
            "spec": {"cpu": {"arch": "x86_64", "cores": 2}, "memory": "1Gi", "selector": {"matchLabels": {"a": "b"}}},
        }
    )


@pytest.fixture
def source() -> LoadedModel:
    model = tiny_cnn()
    return LoadedModel(model, model_digest(model), Path("tiny.onnx"))


@pytest.fixture
def data(source: LoadedModel) -> Dataset:
    # Labels are the FP32 model's own predictions, so FP32 scores 1.0 and any damage shows.
    x = tiny_inputs(48)
    import onnxruntime as ort

    sess = ort.InferenceSession(source.model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = np.argmax(sess.run(None, {"input": x})[0], axis=1)
    return Dataset({"input": x}, labels)


def _recipe(*types: str) -> Recipe:
    return Recipe.model_validate({"passes": [{"type": t} for t in types]})


def test_skipped_failed_and_invalid_passes_are_reported_and_the_recipe_goes_on(
    source: LoadedModel, data: Dataset
) -> None:
    factory = _factory(
        {"GraphOptimization": "shrink", "FP16": "skip", "WeightClustering": "crash", "ChannelPruning": "invalid"}
    )
    result = optimize_for_class(
        source, _device_class(), recipe=_recipe("FP16", "WeightClustering", "ChannelPruning", "GraphOptimization"),
        data=data, pass_factory=factory, latency_rounds=2,
    )  # fmt: skip
    first = result.candidates[0]
    statuses = [(r.type, r.status) for r in first.passes]
    assert statuses == [
        ("FP16", "skipped"),
        ("WeightClustering", "failed"),
        ("ChannelPruning", "failed"),
        ("GraphOptimization", "applied"),
    ]
    assert first.passes[0].reason == "not for this model"
    assert first.passes[1].reason == "RuntimeError: kernel exploded"
    assert "invalid ONNX model" in (first.passes[2].reason or "")
    assert first.passes[3].notes == ["harmless change"]
    assert not first.accepted
    assert "pass failed: WeightClustering, ChannelPruning" in (first.rejection or "")
    # The exact floor is always there and wins here.
    assert result.chosen is not None
    assert result.chosen.name == "fp32-optimized"


def test_a_candidate_over_the_accuracy_budget_is_rejected_with_the_numbers(source: LoadedModel, data: Dataset) -> None:
    result = optimize_for_class(
        source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
        pass_factory=_factory({"WeightClustering": "ruin", "GraphOptimization": "noop"}), latency_rounds=2,
    )  # fmt: skip
    ruined = result.candidates[0]
    assert not ruined.accepted
    assert ruined.rejection is not None
    assert "top1 drops by" in ruined.rejection
    assert "over the budget of 0.0100" in ruined.rejection
    assert require_chosen(result).name == "fp32-optimized"


def test_no_accepted_candidate_is_an_error_naming_every_reason(source: LoadedModel, data: Dataset) -> None:
    result = optimize_for_class(
        source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
        pass_factory=_factory({"WeightClustering": "ruin", "GraphOptimization": "ruin"}), latency_rounds=2,
    )  # fmt: skip
    with pytest.raises(OptimizationError, match="no candidate for device class cpu") as caught:
        require_chosen(result)
    assert "recipe:" in str(caught.value)
    assert "fp32-optimized:" in str(caught.value)


def test_variant_ids_are_content_addressed() -> None:
    a = lineage_for("ab" * 32, [PassSpec.model_validate({"type": "QuantizeInt8"})], None, 0)
    same = lineage_for(
        "ab" * 32, [PassSpec.model_validate({"type": "QuantizeInt8", "quantizeInt8": {"mode": "auto"}})], None, 0
    )
    other = lineage_for(
        "ab" * 32, [PassSpec.model_validate({"type": "QuantizeInt8", "quantizeInt8": {"mode": "static"}})], None, 0
    )
    assert a.variant_id == same.variant_id  # explicit defaults are the same recipe
    assert a.variant_id != other.variant_id
    assert len(a.variant_id) == 64
    assert lineage_for("cd" * 32, [], None, 0).variant_id != lineage_for("ab" * 32, [], None, 0).variant_id


def test_rerunning_the_same_input_is_a_cache_hit(source: LoadedModel, data: Dataset, tmp_path: Path) -> None:
    cache = VariantCache(tmp_path)
    factory = _factory({"WeightClustering": "shrink", "GraphOptimization": "noop"})
    CALLS.clear()
    first = optimize_for_class(source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
                               pass_factory=factory, cache=cache, latency_rounds=2)  # fmt: skip
    assert CALLS == ["shrink", "noop"]
    assert not any(c.cache_hit for c in first.candidates)
    CALLS.clear()
    second = optimize_for_class(source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
                                pass_factory=factory, cache=cache, latency_rounds=2)  # fmt: skip
    assert CALLS == []
    assert all(c.cache_hit for c in second.candidates)
    assert [c.variant_id for c in first.candidates] == [c.variant_id for c in second.candidates]
    assert second.candidates[0].passes[0].status == "applied"  # what the pass did; cache_hit says where from
    assert second.candidates[0].passes[0].notes == ["harmless change"]


def test_a_damaged_cache_entry_is_rebuilt(source: LoadedModel, data: Dataset, tmp_path: Path) -> None:
    cache = VariantCache(tmp_path)
    factory = _factory({"WeightClustering": "shrink", "GraphOptimization": "noop"})
    result = optimize_for_class(source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
                                pass_factory=factory, cache=cache, latency_rounds=2)  # fmt: skip
    entry = tmp_path / "variants" / result.candidates[0].variant_id / "model.onnx"
    entry.write_bytes(entry.read_bytes()[:100])
    CALLS.clear()
    again = optimize_for_class(source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
                               pass_factory=factory, cache=cache, latency_rounds=2)  # fmt: skip
    assert CALLS == ["shrink"]
    assert not again.candidates[0].cache_hit


def test_without_data_the_evaluation_is_synthetic_and_says_so(source: LoadedModel) -> None:
    result = optimize_for_class(source, _device_class(), recipe=_recipe("GraphOptimization"),
                                pass_factory=_factory({"GraphOptimization": "noop"}), latency_rounds=2)  # fmt: skip
    assert result.plan.synthetic
    assert "random inputs" in result.plan.description
    assert result.baseline.metric == "top1Agreement"


def test_calibration_and_evaluation_samples_do_not_overlap(source: LoadedModel, data: Dataset) -> None:
    plan = split_data(data, source.model, 0)
    assert plan.calibration is not None
    assert len(plan.calibration) + len(plan.evaluation) == len(data)
    combined = np.concatenate([plan.calibration.inputs["input"], plan.evaluation.inputs["input"]])
    assert sorted(row.tobytes() for row in combined) == sorted(row.tobytes() for row in data.inputs["input"])
    # A seeded shuffle: the same seed splits the same way, another seed differently.
    again = split_data(data, source.model, 0)
    assert again.calibration is not None
    assert np.array_equal(again.calibration.inputs["input"], plan.calibration.inputs["input"])
    other = split_data(data, source.model, 1)
    assert other.calibration is not None
    assert not np.array_equal(other.calibration.inputs["input"], plan.calibration.inputs["input"])


def test_a_candidate_onnx_runtime_cannot_run_is_rejected_and_the_others_judged(
    source: LoadedModel, data: Dataset
) -> None:
    result = optimize_for_class(
        source, _device_class(), recipe=_recipe("WeightClustering"), data=data,
        pass_factory=_factory({"WeightClustering": "unrunnable", "GraphOptimization": "noop"}), latency_rounds=2,
    )  # fmt: skip
    broken = result.candidates[0]
    assert broken.evaluation is None
    assert not broken.accepted
    assert "cannot be evaluated: ONNX Runtime cannot load it" in (broken.rejection or "")
    assert require_chosen(result).name == "fp32-optimized"


def test_a_model_with_a_fixed_batch_dimension_is_evaluated_in_its_batch(data: Dataset) -> None:
    model = tiny_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed = LoadedModel(model, model_digest(model), Path("fixed.onnx"))
    result = optimize_for_class(fixed, _device_class(), recipe=_recipe("GraphOptimization"), data=data,
                                pass_factory=_factory({"GraphOptimization": "noop"}), latency_rounds=2)  # fmt: skip
    assert result.baseline.latency.p50_ms is not None
    assert require_chosen(result).name == "recipe"


def test_the_same_recipe_for_another_target_is_another_variant() -> None:
    spec = [PassSpec.model_validate({"type": "QuantizeInt8"})]
    cpu = lineage_for("ab" * 32, spec, None, 0, {"executionProvider": "CPUExecutionProvider"})
    npu = lineage_for("ab" * 32, spec, None, 0, {"executionProvider": "OpenVINOExecutionProvider"})
    assert cpu.variant_id != npu.variant_id
