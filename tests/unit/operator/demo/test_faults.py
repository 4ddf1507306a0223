"""The demo's faults: the spec changes, the tampering, and the judges of the system's reaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.demo import faults
from edgefleet_operator.demo.faults import DeviceOutcome, judge_bad_model, judge_tampered
from edgefleet_operator.demo.resources import prepare

ROOT = Path(__file__).resolve().parents[4]
MODEL = ROOT / "examples" / "models" / "digits-small-cnn.onnx"
DATA = ROOT / "examples" / "models" / "digits-small-cnn-data.npz"


def _run(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def test_the_bad_model_answers_only_under_its_new_input_name(tmp_path: Path) -> None:
    bad, data = faults.write_bad_model(MODEL, DATA, tmp_path)
    images = np.load(DATA)["input"][:4]
    np.testing.assert_array_equal(_run(bad, {"pixels": images}), _run(MODEL, {"input": images}))
    with pytest.raises(Exception, match="input"):  # what the devices' applications send fails
        _run(bad, {"input": images})
    with np.load(data) as arrays:
        assert sorted(arrays.files) == ["labels", "pixels"]  # its evaluation data matches it


def test_a_model_with_two_inputs_is_refused() -> None:
    model = onnx.load(str(MODEL))
    model.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(ValueError, match="2 inputs"):
        faults.renamed_input_model(model, "pixels")


def test_the_retrained_model_has_other_bytes_and_the_same_answers(tmp_path: Path) -> None:
    retrained = faults.write_retrained_model(MODEL, tmp_path)
    assert faults.sha256_of(retrained) != faults.sha256_of(MODEL)
    images = np.load(DATA)["input"][:64]
    before, after = _run(MODEL, {"input": images}), _run(retrained, {"input": images})
    assert not np.array_equal(before, after)
    assert (before.argmax(axis=1) == after.argmax(axis=1)).mean() > 0.95


def test_the_spec_changes(tmp_path: Path) -> None:
    resources = prepare(ROOT / "examples" / "demo", tmp_path / "resources")
    original = resources.edge_model
    bad = faults.bad_model_spec(original, "file://./models/b.onnx", "1" * 64, "file://./models/b.npz", "2" * 64)
    assert bad["spec"]["source"] == {"uri": "file://./models/b.onnx", "sha256": "1" * 64}
    assert bad["spec"]["accuracy"]["evaluationData"]["sha256"] == "2" * 64
    assert bad["spec"]["rollout"] == original["spec"]["rollout"]  # the canary wave stays
    paused = faults.tampered_spec(original, "file://./models/r.onnx", "3" * 64)
    assert paused["spec"]["paused"] is True
    assert paused["spec"]["rollout"]["waves"] == [{"percent": 100}]
    assert faults.resumed(paused)["spec"]["paused"] is False
    assert original["spec"]["source"]["uri"] == "file://./models/digits-small-cnn.onnx"  # not changed in place


def test_tampering_flips_every_payload_of_the_version_and_nothing_else(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    keys = {
        "tuf/targets/edge-cpu/demo/digits/2/aa.model.onnx.eft": b"full payload " * 10,
        "tuf/targets/edge-cpu/demo/digits/2/delta-from-1/bb.model.onnx.eft": b"delta payload " * 10,
        "tuf/targets/edge-npu/demo/digits/2/cc.head.onnx.eft": b"head payload " * 10,
        "tuf/targets/edge-cpu/demo/digits/2/dd.manifest.json": b"{}",
        "tuf/targets/edge-cpu/demo/digits/1/ee.model.onnx.eft": b"version one " * 10,
        "tuf/targets/edge-cpu/demo/other/2/ff.model.onnx.eft": b"another model " * 10,
        "tuf/metadata/targets.json": b"{}",
    }
    for key, data in keys.items():
        store.put(key, data)
    changed = faults.tamper_version(store, "demo", "digits", "2")
    assert sorted(changed) == sorted(k for k in keys if "/digits/2/" in k and not k.endswith("manifest.json"))
    for key, data in keys.items():
        now = store.get(key, max_bytes=1 << 20)
        assert len(now) == len(data)
        assert (now != data) == (key in changed), key


def _device(
    name: str, *, bad: bool, outcome: str | None = None, now: str | None = "1", serving: str | None = "1"
) -> DeviceOutcome:
    return DeviceOutcome(name, assigned_bad=bad, install_outcome=outcome, assigned_now=now, serving=serving)


def test_the_bad_model_verdict_passes_only_on_a_complete_rollback() -> None:
    classes = {"edge-cpu", "edge-npu"}
    canary, later = _device("a", bad=True, outcome="succeeded"), _device("b", bad=False)
    passed = judge_bad_model([canary, later], good="1", bad="2", rolled_back_classes=classes, classes=classes)
    assert passed.ok
    assert "1 canary device(s)" in passed.text
    assert "never received version 2" in passed.text
    failures = {
        "not exercised": judge_bad_model([later], good="1", bad="2", rolled_back_classes=classes, classes=classes),
        "class not rolled back": judge_bad_model(
            [canary, later], good="1", bad="2", rolled_back_classes={"edge-cpu"}, classes=classes
        ),
        "canary still on 2": judge_bad_model(
            [_device("a", bad=True, serving="2"), later], good="1", bad="2", rolled_back_classes=classes,
            classes=classes,
        ),
        "later wave off 1": judge_bad_model(
            [canary, _device("b", bad=False, serving=None)], good="1", bad="2", rolled_back_classes=classes,
            classes=classes,
        ),
    }  # fmt: skip
    assert {why: v.ok for why, v in failures.items()} == dict.fromkeys(failures, False)
    assert "edge-npu" in failures["class not rolled back"].text


def test_the_tampered_verdict_needs_every_device_to_refuse_and_keep_serving() -> None:
    refused = [_device(n, bad=True, outcome=faults.REFUSED) for n in ("a", "b")]
    assert judge_tampered(refused, good="1", bad="2").ok
    accepted = judge_tampered([refused[0], _device("b", bad=True, outcome="succeeded")], good="1", bad="2")
    assert not accepted.ok
    assert "b: succeeded" in accepted.text
    assert not judge_tampered([refused[0], _device("b", bad=False)], good="1", bad="2").ok
    assert not judge_tampered([_device("a", bad=True, outcome=faults.REFUSED, serving=None)], good="1", bad="2").ok
    assert not judge_tampered([], good="1", bad="2").ok
