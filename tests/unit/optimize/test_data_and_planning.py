"""Data sets, metrics and recipe planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet_core.errors import DataError
from edgefleet_core.optimize import evaluate
from edgefleet_core.optimize.data import Dataset, load_dataset
from edgefleet_core.optimize.evaluate import choose_metric, interleaved_latency, score_outputs
from edgefleet_core.optimize.planner import auto_recipe, candidate_recipes, target_provider
from edgefleet_core.resources import DeviceClass
from edgefleet_core.resources.recipe import Recipe
from tests.support.tiny_models import tiny_cnn, tiny_inputs


def _npz(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_loads_inputs_by_model_input_name_or_as_inputs(tmp_path: Path) -> None:
    x = tiny_inputs(10)
    labels = np.arange(10) % 10
    by_name = load_dataset(_npz(tmp_path, input=x, labels=labels), tiny_cnn())
    assert len(by_name) == 10
    assert by_name.labels is not None
    by_alias = load_dataset(_npz(tmp_path, inputs=x.astype(np.float64)), tiny_cnn())
    assert by_alias.inputs["input"].dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"other": np.zeros((2, 1, 8, 8), np.float32)}, "no array for model input 'input'"),
        ({"input": np.zeros((2, 8, 8), np.float32)}, "has rank 3"),
        ({"input": np.zeros((2, 1, 8, 9), np.float32)}, "size 9 on axis 3"),
        ({"input": np.zeros((2, 1, 8, 8), np.complex64)}, "expects float32"),
        ({"input": np.zeros((3, 1, 8, 8), np.float32), "labels": np.zeros(2)}, "disagree on the number of samples"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "the data set is empty"),
    ],
)
def test_bad_data_is_refused_naming_the_problem(tmp_path: Path, arrays: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(_npz(tmp_path, **arrays), tiny_cnn())
    assert fragment in caught.value.problem


def test_pickled_arrays_and_non_npz_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(_npz(tmp_path, input=np.array([object()], dtype=object)), tiny_cnn())
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(junk, tiny_cnn())
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.npz", tiny_cnn())


def test_metric_follows_the_data() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    labels = np.array([1, 1])
    assert choose_metric(None, logits, labels) == "top1"
    assert choose_metric(None, logits, None) == "top1Agreement"
    assert choose_metric(None, np.zeros((2, 1), np.float32), None) == "meanAbsoluteError"
    with pytest.raises(DataError, match="needs integer class labels"):
        choose_metric("top1", logits, None)
    assert score_outputs("top1", logits, logits, labels) == (0.5, 0.5)
    assert score_outputs("top1Agreement", logits[::-1], logits, None)[0] == 0.0
    score, error = score_outputs("meanAbsoluteError", logits + 0.5, logits, None)
    assert error == pytest.approx(0.5)
    assert score == pytest.approx(-0.5)


def test_latency_is_unmeasured_not_guessed_for_an_unavailable_provider() -> None:
    data = Dataset({"input": tiny_inputs(4)})
    timing = interleaved_latency({"m": tiny_cnn()}, data, "TensorrtExecutionProvider")["m"]
    assert timing.latency.p50_ms is None
    assert timing.latency.unmeasured_reason == "TensorrtExecutionProvider is not available on this machine"
    assert timing.energy_joules_per_inference is None


def test_latency_measured_on_cpu_and_energy_unavailable_without_rapl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "RAPL_ENERGY", Path("/nonexistent/energy_uj"))
    timings = interleaved_latency(
        {"a": tiny_cnn(), "b": tiny_cnn(seed=2)}, Dataset({"input": tiny_inputs(4)}), rounds=2, runs=6
    )
    figures, energy, reason = (
        timings["a"].latency,
        timings["a"].energy_joules_per_inference,
        timings["a"].energy_unavailable_reason,
    )
    assert timings["b"].latency.runs == 12
    assert figures.p50_ms is not None
    assert figures.p95_ms is not None
    assert figures.p95_ms >= figures.p50_ms
    assert energy is None
    assert reason is not None
    assert "RAPL" in reason


def _class(body: dict[str, Any]) -> DeviceClass:
    base: dict[str, Any] = {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": "c"},
        "spec": {"cpu": {"arch": "x86_64", "cores": 2}, "memory": "1Gi", "selector": {"matchLabels": {"a": "b"}}},
    }
    base["spec"].update(body)
    return DeviceClass.model_validate(base)


def test_auto_recipe_follows_provider_and_precisions() -> None:
    cpu_int8 = _class({"precisions": ["fp32", "int8"]})
    assert [p.type for p in auto_recipe(cpu_int8.spec).passes] == ["GraphOptimization", "MixedPrecision"]
    cpu_fp32 = _class({})
    assert [p.type for p in auto_recipe(cpu_fp32.spec).passes] == ["GraphOptimization"]
    gpu = _class(
        {"precisions": ["fp32", "fp16"], "accelerator": {"type": "gpu", "executionProvider": "CUDAExecutionProvider"}}
    )
    recipe = auto_recipe(gpu.spec)
    assert [p.type for p in recipe.passes] == ["GraphOptimization", "FP16"]
    assert recipe.passes[0].options.model_dump()["level"] == "basic"
    assert target_provider(gpu.spec) == "CUDAExecutionProvider"


def test_candidates_add_fallbacks_and_the_exact_floor() -> None:
    recipe = Recipe.model_validate({"passes": [{"type": "GraphOptimization"}, {"type": "QuantizeInt8"}]})
    names = [c.name for c in candidate_recipes(recipe, "given", trainer_available=True, has_data=True)]
    assert names == ["recipe", "mixed-precision", "qat-int8", "fp32-optimized"]
    qat = candidate_recipes(recipe, "given", trainer_available=True, has_data=True)[2]
    assert [p.type for p in qat.passes] == ["GraphOptimization", "QuantizationAwareTraining", "QuantizeInt8"]
    without = [c.name for c in candidate_recipes(recipe, "given", trainer_available=False, has_data=False)]
    assert without == ["recipe", "fp32-optimized"]
    exact_only = Recipe.model_validate({"passes": [{"type": "GraphOptimization"}]})
    assert [c.name for c in candidate_recipes(exact_only, "given", trainer_available=True, has_data=True)] == ["recipe"]
