"""The sample models: real data split right, emitted graphs equal to their PyTorch modules, reproducible builds."""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch", reason="the sample models need the `train` extra")
pytest.importorskip("sklearn", reason="the sample models need the `train` extra")

import torch

from edgefleet_core.optimize.data import load_dataset
from edgefleet_core.samples import (
    SAMPLES,
    build,
    build_all,
    digits_cnn,
    load_digits_split,
    overparameterized_mlp,
    save_npz,
)
from edgefleet_core.samples.digits import CLASSES, DigitsSplit
from edgefleet_core.samples.graph_builder import OPSET
from edgefleet_core.samples.models import SampleSpec, train_sample
from edgefleet_core.samples.training import deterministic, onnx_logits, torch_logits

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_sample_models.py"
DIGITS = 1797
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def _spec(name: str) -> SampleSpec:
    return SAMPLES[name]


# ------------------------------------------------------------------------------------- the data


def test_split_has_the_documented_shapes_types_and_ranges(split: DigitsSplit) -> None:
    assert len(split.train) + len(split.test) == DIGITS
    assert len(split.test) == 360
    for part in (split.train, split.test):
        assert part.images.dtype == np.float32
        assert part.images.shape == (len(part), 1, 8, 8)
        assert part.labels.dtype == np.int64
        assert part.labels.shape == (len(part),)
        assert part.images.min() == 0.0
        assert part.images.max() == 1.0
        assert set(np.unique(part.labels)) == set(range(CLASSES))
        # 17 intensity levels, scaled by 16: every pixel is a multiple of 1/16.
        np.testing.assert_array_equal(part.images * 16, np.round(part.images * 16))
        assert part.flat().shape == (len(part), 64)
        assert part.rows().shape == (len(part), 8, 8)
        np.testing.assert_array_equal(part.flat()[:, 8:16], part.images[:, 0, 1, :])
        np.testing.assert_array_equal(part.rows()[:, 3], part.images[:, 0, 3])


def test_split_is_stratified(split: DigitsSplit) -> None:
    train = np.bincount(split.train.labels, minlength=CLASSES)
    test = np.bincount(split.test.labels, minlength=CLASSES)
    share = test / (train + test)
    # Each class has 174..183 images; a stratified 20 % split puts 35 or 36 of each in test.
    assert np.all(np.abs(share - 0.2) < 0.01), share


def test_split_is_reproducible_and_depends_on_the_seed(split: DigitsSplit) -> None:
    again = load_digits_split()
    np.testing.assert_array_equal(again.test.images, split.test.images)
    np.testing.assert_array_equal(again.train.labels, split.train.labels)
    other = load_digits_split(seed=1)
    assert not np.array_equal(other.test.images, split.test.images)


def test_npz_round_trips_in_the_pipelines_data_format(tmp_path: Path, split: DigitsSplit) -> None:
    path = tmp_path / "digits.npz"
    save_npz(path, split.test.images, split.test.labels)
    with np.load(path, allow_pickle=False) as stored:
        assert sorted(stored.files) == ["input", "labels"]
        np.testing.assert_array_equal(stored["input"], split.test.images)
        np.testing.assert_array_equal(stored["labels"], split.test.labels)
        assert stored["input"].dtype == np.float32
        assert stored["labels"].dtype == np.int64

    # The pipeline's reader accepts it for a model whose input is ``input``.
    with deterministic(0):
        module = _spec("digits-cnn").make()
    model = _spec("digits-cnn").emit(module, "digits-cnn", "")
    dataset = load_dataset(path, model)
    assert len(dataset) == len(split.test)
    assert dataset.labels is not None
    np.testing.assert_array_equal(dataset.labels, split.test.labels)


def test_npz_without_labels_and_mismatched_lengths(tmp_path: Path, split: DigitsSplit) -> None:
    save_npz(tmp_path / "unlabeled.npz", split.test.flat())
    with np.load(tmp_path / "unlabeled.npz") as stored:
        assert stored.files == ["input"]
    with pytest.raises(ValueError, match="360 inputs but 10 labels"):
        save_npz(tmp_path / "bad.npz", split.test.images, split.test.labels[:10])
    assert not (tmp_path / "bad.npz").exists()


# ------------------------------------------------------------------------- the emitted graphs


def _perturbed(spec: SampleSpec) -> torch.nn.Module:
    # Untrained weights suffice to prove the graph computes what the module does, but default
    # initializations hide mistakes (BatchNorm statistics 0 and 1, LayerNorm scale 1 and shift 0),
    # so every parameter and buffer gets seeded noise first.
    with deterministic(7):
        module = spec.make()
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
            for buffer_name, buffer in module.named_buffers():
                if buffer_name.endswith("running_mean"):
                    buffer.uniform_(-0.5, 0.5)
                elif buffer_name.endswith("running_var"):
                    buffer.uniform_(0.5, 2.0)
    module.eval()
    return module


@pytest.mark.parametrize("name", list(SAMPLES))
def test_onnx_graph_equals_the_torch_module(name: str, split: DigitsSplit) -> None:
    spec = _spec(name)
    module = _perturbed(spec)
    model = spec.emit(module, name, spec.description)

    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "N"
    (graph_output,) = model.graph.output
    assert graph_output.name == "logits"
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == ["N", CLASSES]

    inputs = spec.view(split.test)
    for batch in (1, 7, 64):
        expected = torch_logits(module, inputs[:batch])
        actual = onnx_logits(model, inputs[:batch])
        assert actual.shape == (batch, CLASSES)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _two_d_matmul_weights(model: onnx.ModelProto) -> int:
    dims = {init.name: len(init.dims) for init in model.graph.initializer}
    return sum(1 for node in model.graph.node if node.op_type == "MatMul" and dims.get(node.input[1]) == 2)


def test_graphs_have_the_structure_the_passes_are_tested_on() -> None:
    cnn = _spec("digits-cnn").emit(_perturbed(_spec("digits-cnn")), "cnn", "")
    assert _op_types(cnn) == [
        *["Conv", "BatchNormalization", "Relu"] * 3,
        *["MaxPool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"],
    ]
    # Under ~1 MB so it may be committed, with the weights making up nearly all of the file.
    size = len(cnn.SerializeToString())
    weights = sum(int(np.prod(init.dims)) * 4 for init in cnn.graph.initializer)
    assert size < 1_000_000
    assert weights / size > 0.99

    wide = _spec("wide-cnn").emit(_perturbed(_spec("wide-cnn")), "wide", "")
    assert _op_types(wide) == [*["Conv", "Relu"] * 3, "MaxPool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]

    mlp = _spec("overparameterized-mlp").emit(_perturbed(_spec("overparameterized-mlp")), "mlp", "")
    assert _op_types(mlp) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]

    transformer = _spec("tiny-transformer").emit(_perturbed(_spec("tiny-transformer")), "tf", "")
    ops = _op_types(transformer)
    # Embedding, then per layer Q, K, V, out and two feed-forward projections.
    assert _two_d_matmul_weights(transformer) == 1 + 2 * 6
    assert ops.count("LayerNormalization") == 4
    assert ops.count("Softmax") == 2
    assert ops.count("Gemm") == 1
    assert ops[-2:] == ["ReduceMean", "Gemm"]


# ------------------------------------------------------------------------------------ training


def test_digits_cnn_trained_briefly_is_well_above_chance(split: DigitsSplit) -> None:
    sample = digits_cnn(epochs=2, split=split)
    assert sample.accuracy >= 0.85
    assert sample.name == "digits-cnn"
    assert sample.epochs == 2
    assert sample.parameters == 241_770
    assert sample.train_seconds > 0
    assert sample.fp32_bytes() < 1_000_000
    assert sample.test_inputs.shape == (360, 1, 8, 8)
    # The recorded accuracy is ONNX Runtime's, on the test split.
    predicted = onnx_logits(sample.model, sample.test_inputs).argmax(axis=1)
    assert sample.accuracy == pytest.approx(float(np.mean(predicted == sample.test_labels)))


def test_same_seed_gives_byte_identical_onnx_and_leaves_torch_settings_alone(split: DigitsSplit) -> None:
    threads = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    state = torch.get_rng_state()

    first = overparameterized_mlp(epochs=1, split=split)
    second = overparameterized_mlp(epochs=1, split=split)
    other_seed = overparameterized_mlp(epochs=1, seed=1, split=split)

    assert first.model.SerializeToString(deterministic=True) == second.model.SerializeToString(deterministic=True)
    assert first.model.SerializeToString(deterministic=True) != other_seed.model.SerializeToString(deterministic=True)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_sample_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no sample model named 'resnet50'; known: digits-cnn"):
        build("resnet50")


# ---------------------------------------------------------------------------------- the outputs


def test_build_all_writes_models_data_and_an_index_it_keeps_up_to_date(tmp_path: Path) -> None:
    build_all(tmp_path, quick=True, names=["overparameterized-mlp"])
    index = json.loads((tmp_path / "index.json").read_text())
    (entry,) = index["models"]
    assert entry["name"] == "overparameterized-mlp"
    assert entry["epochs"] == _spec("overparameterized-mlp").quick_epochs
    assert entry["fp32_bytes"] == (tmp_path / "overparameterized-mlp.onnx").stat().st_size
    assert entry["test_samples"] == 360
    assert 0.9 <= entry["accuracy"] <= 1.0

    model = onnx.load(tmp_path / "overparameterized-mlp.onnx")
    dataset = load_dataset(tmp_path / "overparameterized-mlp-data.npz", model)
    assert dataset.inputs["input"].shape == (360, 64)
    assert dataset.labels is not None
    predicted = onnx_logits(model, np.asarray(dataset.inputs["input"], dtype=np.float32)).argmax(axis=1)
    assert float(np.mean(predicted == dataset.labels)) == pytest.approx(entry["accuracy"])

    # Building another sample into the same folder keeps the first one's entry.
    build_all(tmp_path, quick=True, names=["tiny-transformer"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["name"] for e in index["models"]] == ["overparameterized-mlp", "tiny-transformer"]
    assert index["models"][0] == entry
    with np.load(tmp_path / "tiny-transformer-data.npz") as stored:
        assert stored["input"].shape == (360, 8, 8)
    assert not list(tmp_path.glob(".*"))


def test_script_prints_a_table_of_what_it_built(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main: Callable[[list[str]], int] = runpy.run_path(str(SCRIPT))["main"]
    assert main([str(tmp_path), "--quick", "--only", "overparameterized-mlp"]) == 0
    printed = capsys.readouterr().out
    assert "overparameterized-mlp" in printed
    assert "1,126,410" in printed
    assert (tmp_path / "overparameterized-mlp.onnx").is_file()


# ------------------------------------------------------------------------------ full-size builds


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "minimum_accuracy"),
    [("digits-cnn", 0.97), ("overparameterized-mlp", 0.96), ("wide-cnn", 0.96), ("tiny-transformer", 0.90)],
)
def test_full_builds_reach_their_accuracy_targets(name: str, minimum_accuracy: float, split: DigitsSplit) -> None:
    sample = train_sample(_spec(name), _spec(name).epochs, split=split)
    assert sample.accuracy >= minimum_accuracy
    assert sample.train_seconds < 60
