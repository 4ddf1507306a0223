"""Self-test data in bundle manifests: computed on ONNX Runtime CPU, size-capped, checked with tolerances."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from edgefleet_core.bundle.distribution import BundleRef, build_bundles
from edgefleet_core.bundle.manifest import parse_manifest
from edgefleet_core.bundle.selftest import SelfTest, SelfTestTensor, check_outputs, generate_inputs, make_self_test
from edgefleet_core.cli.main import build_app
from edgefleet_core.errors import BundleError
from tests.support.tiny_models import tiny_cnn
from tests.unit.agent.bundle_world import head_tail, wide_identity

CNN = tiny_cnn().SerializeToString()


def _with_external_weight() -> bytes:
    """The CNN with its conv weight moved to an external file ``w.bin`` (which need not exist)."""
    model = tiny_cnn()
    [weight] = [t for t in model.graph.initializer if t.name == "conv_w"]
    length = len(weight.raw_data) or 4 * len(weight.float_data)
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    return model.SerializeToString()


def test_make_self_test_records_cpu_outputs_of_the_exact_bytes() -> None:
    test = make_self_test({"model.onnx": CNN}, latency_slo_ms=20, seed=3)
    [given] = test.inputs
    assert (given.name, given.dtype, given.shape) == ("input", "float32", [1, 1, 8, 8])
    [logits] = test.outputs
    assert (logits.name, logits.shape) == ("logits", [1, 10])
    assert test.latency_slo_ms == 20
    assert test.runs >= 1
    assert make_self_test({"model.onnx": CNN}, seed=3) == test.model_copy(update={"latency_slo_ms": None})
    assert check_outputs(test, {"logits": logits.array()}) is None
    sample = np.full((2, 1, 8, 8), 0.5, np.float32)
    from_sample = make_self_test({"model.onnx": CNN}, inputs={"input": sample})
    np.testing.assert_array_equal(from_sample.inputs[0].array(), sample)
    assert from_sample.outputs[0].shape == [2, 10]


def test_head_then_tail_feeds_the_cut_tensors_by_name() -> None:
    files = head_tail()
    test = make_self_test(files)
    assert [t.name for t in test.inputs] == ["x"]
    assert [t.name for t in test.outputs] == ["y"]
    assert test.outputs[0].shape == [1, 4]


@pytest.mark.parametrize(
    ("files", "inputs", "message"),
    [
        ({"model.onnx": CNN, "tail.onnx": CNN}, None, "model.onnx, or head.onnx and tail.onnx"),
        ({"model.onnx": b"garbage"}, None, "cannot load"),
        ({"model.onnx": CNN}, {"other": np.zeros(1, np.float32)}, "model's inputs"),
        ({"model.onnx": CNN}, {"input": np.zeros((1, 1, 8, 8), np.float64)}, "takes tensor"),
        ({"model.onnx": CNN}, {"input": np.zeros((1, 1, 7), np.float32)}, "cannot run"),
        ({"model.onnx": wide_identity(20_000)}, None, "over the 65536-byte cap"),
        ({"model.onnx": _with_external_weight()}, None, "tensor 'conv_w' uses external data"),
    ],
)
def test_make_self_test_refuses(files: dict[str, bytes], inputs: dict[str, np.ndarray] | None, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        make_self_test(files, inputs=inputs)


def test_generated_inputs_are_deterministic_and_in_range() -> None:
    specs: list[tuple[str, str, tuple[int | str | None, ...]]] = [
        ("f", "tensor(float16)", ("N", 3)),
        ("i", "tensor(int64)", (2, None)),
        ("b", "tensor(bool)", (4,)),
    ]
    first, second = generate_inputs(specs, seed=1), generate_inputs(specs, seed=1)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert first["f"].shape == (1, 3)
    assert first["f"].dtype == np.float16
    assert set(np.unique(first["i"])) <= {0, 1}
    assert first["b"].dtype == np.bool_
    with pytest.raises(BundleError, match="cannot generate"):
        generate_inputs([("s", "tensor(string)", (1,))])


def _test(golden: np.ndarray, rtol: float = 1e-3, atol: float = 1e-4) -> SelfTest:
    return SelfTest(
        inputs=[SelfTestTensor.from_array("x", np.zeros(1, np.float32))],
        outputs=[SelfTestTensor.from_array("y", golden)],
        rtol=rtol,
        atol=atol,
    )


def test_check_outputs_tolerances_and_non_finite_values() -> None:
    golden = np.array([1.0, 2.0, np.nan], np.float32)
    test = _test(golden, rtol=1e-3, atol=1e-4)
    assert check_outputs(test, {"y": golden.copy()}) is None
    assert check_outputs(test, {"y": golden * np.float32(1.0005)}) is None
    assert "outside" in (check_outputs(test, {"y": golden + np.float32(0.1)}) or "")
    assert "non-finite" in (check_outputs(test, {"y": np.array([np.inf, 2, np.nan], np.float32)}) or "")
    assert "missing" in (check_outputs(test, {}) or "")
    assert "float64" in (check_outputs(test, {"y": golden.astype(np.float64)}) or "")
    assert "shape" in (check_outputs(test, {"y": golden[:2]}) or "")
    labels = _test(np.array([3, 1], np.int64))
    assert check_outputs(labels, {"y": np.array([3, 1], np.int64)}) is None
    assert "1 of 2 values differ" in (check_outputs(labels, {"y": np.array([3, 2], np.int64)}) or "")


def test_tensor_and_self_test_validation() -> None:
    good = SelfTestTensor.from_array("x", np.arange(6, dtype=np.int32).reshape(2, 3))
    assert good.array().tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValidationError, match="need 24"):
        SelfTestTensor(name="x", dtype="int32", shape=[2, 3], data=base64.b64encode(b"abc").decode())
    with pytest.raises(ValidationError, match="not base64"):
        SelfTestTensor(name="x", dtype="int32", shape=[1], data="@@@@")
    with pytest.raises(ValidationError, match="dtype"):
        SelfTestTensor.model_validate({"name": "x", "dtype": "complex64", "shape": [1], "data": ""})
    with pytest.raises(BundleError, match="cannot carry"):
        SelfTestTensor.from_array("x", np.zeros(1, np.complex64))
    with pytest.raises(ValidationError, match="repeat a name"):
        SelfTest(inputs=[good, good], outputs=[good])
    big = SelfTestTensor.from_array("y", np.zeros(9000, np.float32))
    with pytest.raises(ValidationError, match="cap"):
        SelfTest(inputs=[big], outputs=[big.model_copy(update={"name": "z"})])
    with pytest.raises(ValidationError):
        SelfTest(inputs=[good], outputs=[good], runs=0)


def test_manifests_carry_the_self_test_in_camel_case() -> None:
    test = make_self_test({"model.onnx": CNN}, latency_slo_ms=5)
    ref = BundleRef("vision", "digits", "cpu")
    other = tiny_cnn(seed=1).SerializeToString()
    bundles = build_bundles({"model.onnx": other}, ref, "2", variant_id="ab" * 32, lineage={}, recipe=[],
                            metrics={}, base=("1", {"model.onnx": CNN}), self_test=test)  # fmt: skip
    assert len(bundles) == 2
    assert all(b.manifest.self_test == test for b in bundles)
    canonical = bundles[0].manifest.canonical_json()
    assert json.loads(canonical)["selfTest"]["latencySloMs"] == 5
    assert parse_manifest(canonical) == bundles[0].manifest
    [plain] = build_bundles({"model.onnx": CNN}, ref, "1", variant_id="ab" * 32, lineage={}, recipe=[], metrics={})
    assert b"selfTest" not in plain.manifest.canonical_json()  # older manifests keep their signed bytes


def test_publish_computes_the_self_test_by_default(tmp_path: Path) -> None:
    runner = CliRunner()
    app = build_app()
    keys, store = tmp_path / "keys", f"file://{tmp_path / 'store'}"
    assert runner.invoke(app, ["keys", "init", str(keys)]).exit_code == 0
    model = tmp_path / "model.onnx"
    model.write_bytes(CNN)
    golden = tmp_path / "golden.npz"
    np.savez(golden, input=np.full((3, 1, 8, 8), 0.25, np.float32))

    def publish(version: str, *extra: str) -> str:
        result = runner.invoke(app, ["publish", str(model), "--store", store, "--keys", str(keys), "--model", "digits",
                                     "--version", version, "--device-class", "cpu", *extra])  # fmt: skip
        assert result.exit_code == 0, result.output
        return result.output

    assert "self-test: 1 inputs, 1 outputs, latency SLO 50.0 ms" in publish("1", "--latency-slo-ms", "50")
    assert "self-test" not in publish("2", "--no-self-test")
    publish("3", "--golden-data", str(golden))
    manifests = {p.parent.name: json.loads(p.read_bytes()) for p in (tmp_path / "store").rglob("*manifest.json")}
    by_version = {m["version"]: m for m in manifests.values()}
    assert by_version["1"]["selfTest"]["latencySloMs"] == 50
    assert "selfTest" not in by_version["2"]
    assert by_version["3"]["selfTest"]["inputs"][0]["shape"] == [3, 1, 8, 8]
    bad = runner.invoke(app, ["publish", str(model), "--store", store, "--keys", str(keys), "--model", "digits",
                              "--version", "4", "--device-class", "cpu", "--golden-data", str(model)])  # fmt: skip
    assert bad.exit_code == 1
    assert "not an NPZ" in bad.output
