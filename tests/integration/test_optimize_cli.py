"""``edgefleet optimize`` end to end: real passes, real ONNX Runtime, bad inputs refused atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.samples.digits import load_digits_split, save_npz
from edgefleet_core.samples.models import SampleModel, build

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CPU_CLASS = ROOT / "examples" / "valid" / "deviceclass-x86-cpu.yaml"
runner = CliRunner()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SampleModel]:
    """The digits CNN (quick build) and 400 real samples with labels."""
    folder = tmp_path_factory.mktemp("cnn")
    sample = build("digits-cnn", quick=True, split=load_digits_split())
    model = folder / "digits-cnn.onnx"
    model.write_bytes(serialize(sample.model))
    split = load_digits_split()
    data = folder / "data.npz"
    save_npz(data, np.concatenate([split.train.images[:200], split.test.images[:200]]),
             np.concatenate([split.train.labels[:200], split.test.labels[:200]]))  # fmt: skip
    return model, data, sample


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path / "cache"))


def optimize(*args: str) -> tuple[int, str]:
    result = runner.invoke(build_app(), ["optimize", *args])
    return result.exit_code, result.stdout + result.stderr


def _recipe(tmp_path: Path, passes: list[dict[str, Any]]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"passes": passes}), encoding="utf-8")
    return path


def test_optimize_writes_model_report_and_plot(cnn: tuple[Path, Path, SampleModel], tmp_path: Path) -> None:
    model, data, _ = cnn
    out = tmp_path / "out"
    code, output = optimize(str(model), "--device-class", str(CPU_CLASS), "--data", str(data), "--out", str(out))
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["deviceClass"] == "x86-cpu"
    assert report["metric"] == "top1"
    assert report["chosen"] is not None
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["accepted"]
    assert len(chosen["variantId"]) == 64
    assert chosen["evaluation"]["latency"]["p50_ms"] > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    # Every candidate says what it is and, if rejected, why.
    for candidate in report["candidates"]:
        assert candidate["accepted"] or candidate["rejection"]


def test_every_pass_is_reachable_from_a_recipe(cnn: tuple[Path, Path, SampleModel], tmp_path: Path) -> None:
    model, data, _ = cnn
    recipe = _recipe(tmp_path, [
        {"type": "ChannelPruning", "channelPruning": {"ratio": 0.25, "fineTuneEpochs": 1}},
        {"type": "LowRankFactorization", "lowRankFactorization": {"method": "tucker", "rankRatio": 0.75}},
        {"type": "MagnitudePruning", "magnitudePruning": {"sparsity": 0.5, "fineTuneEpochs": 0}},
        {"type": "Distillation", "distillation": {"epochs": 1}},
        {"type": "WeightClustering", "weightClustering": {"bits": 6}},
        {"type": "QuantizationAwareTraining", "quantizationAwareTraining": {"epochs": 1}},
        {"type": "GraphOptimization"},
        {"type": "QuantizeInt8", "quantizeInt8": {"mode": "static", "calibrationSamples": 64}},
    ])  # fmt: skip
    out = tmp_path / "out"
    code, output = optimize(str(model), "--device-class", str(CPU_CLASS), "--data", str(data), "--recipe",
                            str(recipe), "--out", str(out), "--max-accuracy-drop", "100")  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    first = report["candidates"][0]
    statuses = {p["type"]: (p["status"], p["reason"]) for p in first["passes"]}
    assert all(status == "applied" for status, _ in statuses.values()), statuses
    applied = {p["type"] for c in report["candidates"] for p in c["passes"] if p["status"] == "applied"}
    # MixedPrecision comes in as the fallback to QuantizeInt8; FP16 and svd need their own recipe.
    assert "MixedPrecision" in applied
    mlp_recipe = _recipe(tmp_path, [{"type": "LowRankFactorization"}, {"type": "FP16"}])
    code, output = optimize(str(model), "--device-class", str(CPU_CLASS), "--data", str(data), "--recipe",
                            str(mlp_recipe), "--out", str(tmp_path / "out2"), "--max-accuracy-drop", "100")  # fmt: skip
    assert code == 0, output
    second = json.loads((tmp_path / "out2" / "report.json").read_text())["candidates"][0]
    assert {p["type"]: p["status"] for p in second["passes"]}["FP16"] == "applied"
    applied |= {p["type"] for p in second["passes"] if p["status"] == "applied"}
    from edgefleet_core.resources.recipe import OPTIONS_BY_PASS

    assert applied == set(OPTIONS_BY_PASS)


@pytest.fixture
def previous_output(tmp_path: Path) -> Path:
    """An earlier run's output folder, which a failed run must leave exactly as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous good variant")
    (out / "report.json").write_text("{}", encoding="utf-8")
    return out


def _unchanged(out: Path) -> bool:
    return (
        sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
        and (out / "model.onnx").read_bytes() == b"the previous good variant"
    )


def _no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"GIF89a not a model", "not an ONNX model"), (b"", "file is empty")],
)
def test_not_onnx_is_refused_and_nothing_is_written(
    tmp_path: Path, previous_output: Path, content: bytes, fragment: str
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, output = optimize(str(bad), "--device-class", str(CPU_CLASS), "--out", str(previous_output))
    assert code == 1
    assert fragment in output
    assert _unchanged(previous_output)
    assert _no_leftovers(tmp_path)


def test_truncated_model_is_refused(cnn: tuple[Path, Path, SampleModel], tmp_path: Path, previous_output: Path) -> None:
    model, _, _ = cnn
    cut = tmp_path / "cut.onnx"
    data = model.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    code, output = optimize(str(cut), "--device-class", str(CPU_CLASS), "--out", str(previous_output))
    assert code == 1
    assert "cut.onnx" in output
    assert _unchanged(previous_output)


def test_external_data_outside_the_folder_is_refused(tmp_path: Path, previous_output: Path) -> None:
    from tests.unit.optimize.test_model_io import _with_external

    (tmp_path / "secret.bin").write_bytes(b"\x00" * 1024)
    path = _with_external(tmp_path, "../secret.bin")
    code, output = optimize(str(path), "--device-class", str(CPU_CLASS), "--out", str(previous_output))
    assert code == 1
    assert "points outside the model's folder" in output
    assert _unchanged(previous_output)


def test_empty_calibration_set_is_refused(
    cnn: tuple[Path, Path, SampleModel], tmp_path: Path, previous_output: Path
) -> None:
    model, _, _ = cnn
    empty = tmp_path / "empty.npz"
    np.savez(empty, input=np.zeros((0, 1, 8, 8), np.float32), labels=np.zeros((0,), np.int64))
    code, output = optimize(
        str(model), "--device-class", str(CPU_CLASS), "--data", str(empty), "--out", str(previous_output)
    )
    assert code == 1
    assert "the data set is empty" in output
    assert _unchanged(previous_output)


def test_an_op_onnx_runtime_cannot_run_is_refused(tmp_path: Path, previous_output: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["input"], ["logits"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    path.write_bytes(serialize(model))
    code, output = optimize(str(path), "--device-class", str(CPU_CLASS), "--out", str(previous_output))
    assert code == 1
    assert "ONNX Runtime cannot load it" in output
    assert _unchanged(previous_output)


def test_a_pass_that_cannot_handle_the_model_is_skipped_and_reported(
    cnn: tuple[Path, Path, SampleModel], tmp_path: Path
) -> None:
    model, _, _ = cnn
    # Static quantization without calibration data cannot apply; the recipe goes on without it.
    recipe = _recipe(
        tmp_path, [{"type": "GraphOptimization"}, {"type": "QuantizeInt8", "quantizeInt8": {"mode": "static"}}]
    )
    out = tmp_path / "out"
    code, output = optimize(str(model), "--device-class", str(CPU_CLASS), "--recipe", str(recipe), "--out", str(out))
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    quantize = next(p for p in report["candidates"][0]["passes"] if p["type"] == "QuantizeInt8")
    assert quantize["status"] == "skipped"
    assert "calibration data" in quantize["reason"]
    assert report["data"]["synthetic"]


def test_bad_recipe_and_device_class_are_refused_naming_the_field(
    cnn: tuple[Path, Path, SampleModel], tmp_path: Path, previous_output: Path
) -> None:
    model, _, _ = cnn
    recipe = _recipe(tmp_path, [{"type": "QuantizeInt8", "quantizeInt8": {"mode": "sometimes"}}])
    code, output = optimize(
        str(model), "--device-class", str(CPU_CLASS), "--recipe", str(recipe), "--out", str(previous_output)
    )
    assert code == 1
    assert "passes[0].quantizeInt8.mode" in output
    bad_class = ROOT / "examples" / "invalid" / "deviceclass-unknown-execution-provider.yaml"
    code, output = optimize(str(model), "--device-class", str(bad_class), "--out", str(previous_output))
    assert code == 1
    assert "spec.accelerator.executionProvider" in output
    assert _unchanged(previous_output)


def _awkward_model() -> onnx.ModelProto:
    """Opset 11, dynamic batch and spatial dims, and a Resize the trainer cannot differentiate."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 32)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Resize", ["input", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "awkward",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return model


def test_an_awkward_real_world_model_gets_through_every_pass_or_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "awkward.onnx"
    path.write_bytes(serialize(_awkward_model()))
    split = load_digits_split()
    data = tmp_path / "data.npz"
    save_npz(data, split.test.images[:120], split.test.labels[:120])
    recipe = _recipe(tmp_path, [
        {"type": "ChannelPruning", "channelPruning": {"ratio": 0.25, "fineTuneEpochs": 1}},
        {"type": "LowRankFactorization", "lowRankFactorization": {"method": "spatialSvd", "rankRatio": 0.5}},
        {"type": "MagnitudePruning", "magnitudePruning": {"sparsity": 0.3}},
        {"type": "Distillation", "distillation": {"epochs": 1}},
        {"type": "WeightClustering", "weightClustering": {"bits": 6}},
        {"type": "QuantizationAwareTraining", "quantizationAwareTraining": {"epochs": 1}},
        {"type": "GraphOptimization"},
        {"type": "MixedPrecision"},
        {"type": "FP16"},
        {"type": "QuantizeInt8"},
    ])  # fmt: skip
    out = tmp_path / "out"
    code, output = optimize(str(path), "--device-class", str(CPU_CLASS), "--data", str(data), "--recipe",
                            str(recipe), "--out", str(out), "--max-accuracy-drop", "100")  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert "upgraded opset 11 to 17" in report["source"]["notes"]
    for candidate in report["candidates"]:
        for record in candidate["passes"]:
            assert record["status"] in {"applied", "skipped", "failed"}
            if record["status"] != "applied":
                assert record["reason"], record
    statuses = {p["type"]: p for p in report["candidates"][0]["passes"]}
    # The trainer cannot differentiate Resize: the training passes say so instead of failing.
    assert statuses["Distillation"]["status"] == "skipped"
    assert "Resize" in statuses["Distillation"]["reason"]
    # The chosen variant still takes other spatial sizes (the dynamic dims survived).
    import onnxruntime as ort

    sess = ort.InferenceSession((out / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((3, 1, 12, 12), np.float32)})[0].shape == (3, 10)


def test_an_existing_folder_that_is_not_an_output_is_never_replaced(
    cnn: tuple[Path, Path, SampleModel], tmp_path: Path
) -> None:
    model, _, _ = cnn
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work", encoding="utf-8")
    code, output = optimize(str(model), "--device-class", str(CPU_CLASS), "--out", str(precious))
    assert code == 1
    assert "is not an edgefleet optimize output" in output
    assert (precious / "thesis.tex").read_text(encoding="utf-8") == "years of work"
