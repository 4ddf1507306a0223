"""``edgefleet partition plan`` end to end: real cuts, real ONNX Runtime, bad inputs refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.runtime import run, session
from edgefleet_core.partition.cuts import VERIFY_OPTIMIZATION
from edgefleet_core.partition.profile import example_inputs
from tests.support.tiny_models import tiny_cnn, wide_mlp

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "valid"
JETSON = EXAMPLES / "deviceclass-jetson-gpu.yaml"  # TensorRT with a 20000 MB/s link
USB_NPU = EXAMPLES / "deviceclass-usb-npu.yaml"  # OpenVINO with a 320 MB/s link
CPU_ONLY = EXAMPLES / "deviceclass-x86-cpu.yaml"  # no accelerator
runner = CliRunner()


def partition(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(build_app(), ["partition", "plan", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.stdout, result.stderr


def _model(tmp_path: Path, model: onnx.ModelProto, name: str) -> Path:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(serialize(model))
    return path


@pytest.mark.parametrize(("build", "device_class"), [(tiny_cnn, JETSON), (wide_mlp, USB_NPU)], ids=["cnn", "mlp"])
def test_plan_prints_every_candidate_and_the_chosen_one(build: object, device_class: Path, tmp_path: Path) -> None:
    path = _model(tmp_path, build(), "model")  # type: ignore[operator]
    code, out, err = partition(str(path), "--device-class", str(device_class), "--runs", "2", "--measure")
    assert code == 0, out + err
    assert "no split" in err
    assert "chosen:" in err
    assert "measured latency ms" in err
    assert "tails were timed on CPUExecutionProvider" in err  # no TensorRT/OpenVINO here, and it says so


def test_json_and_out_write_a_verified_head_tail_and_plan(tmp_path: Path) -> None:
    model = wide_mlp()
    path = _model(tmp_path, model, "wide_mlp")
    out = tmp_path / "out"
    code, stdout, err = partition(
        str(path), "--device-class", str(JETSON), "--runs", "2", "--cut", "a0", "--json", "--out", str(out)
    )
    assert code == 0, stdout + err
    printed = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["head.onnx", "plan.json", "tail.onnx"]
    plan_bytes = (out / "plan.json").read_bytes()
    assert hashlib.sha256(plan_bytes).hexdigest() == printed["planId"]
    plan = json.loads(plan_bytes)
    assert plan == printed["plan"]
    assert plan["manualCut"] == ["a0"]
    assert plan["chosenCut"] is not None
    assert plan["deviceClass"] == "jetson-orin-nano"
    assert plan["tailMeasuredOn"] == "CPUExecutionProvider"
    # The written head and tail reproduce the whole model bit for bit.
    head, tail = onnx.load(out / "head.onnx"), onnx.load(out / "tail.onnx")
    feed = example_inputs(model)
    (expected,) = run(session(model, optimization=VERIFY_OPTIMIZATION), ["y"], feed)
    (a0,) = run(session(head, optimization=VERIFY_OPTIMIZATION), ["a0"], feed)
    (got,) = run(session(tail, optimization=VERIFY_OPTIMIZATION), ["y"], {"a0": a0})
    assert got.dtype == expected.dtype
    assert np.array_equal(got, expected)
    # Run again into the same folder: it is an earlier output of ours, so it is replaced.
    code, stdout, err = partition(str(path), "--device-class", str(JETSON), "--runs", "1", "--out", str(out))
    assert code == 0, stdout + err
    assert (out / "plan.json").is_file()


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    model = _model(tmp_path, tiny_cnn(), "cnn")
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello", encoding="utf-8")
    code, _, err = partition(str(not_onnx), "--device-class", str(JETSON))
    assert code == 1
    assert "not an ONNX model" in err
    code, _, err = partition(str(model), "--device-class", str(CPU_ONLY))
    assert code == 1
    assert "no accelerator" in err
    body = yaml.safe_load(JETSON.read_text(encoding="utf-8"))
    del body["spec"]["accelerator"]["link"]
    no_link = tmp_path / "no-link.yaml"
    no_link.write_text(yaml.safe_dump(body), encoding="utf-8")
    code, _, err = partition(str(model), "--device-class", str(no_link))
    assert code == 1
    assert "link" in err
    code, _, err = partition(str(model), "--device-class", str(JETSON), "--cut", "nope", "--runs", "1")
    assert code == 1
    assert "nope" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep", encoding="utf-8")
    code, _, err = partition(str(model), "--device-class", str(JETSON), "--out", str(taken))
    assert code == 1
    assert "not an edgefleet partition output" in err
    assert (taken / "mine.txt").read_text(encoding="utf-8") == "keep"


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(build_app(), ["partition", "run", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def planned(tmp_path: Path) -> Path:
    """A `partition plan --out` folder of the tiny CNN, a stream of inputs, and the model, all in tmp_path."""
    model = tiny_cnn()
    path = _model(tmp_path, model, "model")
    code, out, err = partition(
        str(path), "--device-class", str(JETSON), "--runs", "1", "--cut", "r1", "--out", str(tmp_path / "p")
    )
    assert code == 0, out + err
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "stream.npz", input=rng.normal(0, 1, (6, 1, 8, 8)).astype(np.float32))
    return tmp_path / "p"


@pytest.mark.parametrize("mode", ["--pipelined", "--sequential"])
def test_run_streams_inputs_through_head_and_tail(planned: Path, mode: str) -> None:
    stream, model = planned.parent / "stream.npz", planned.parent / "model.onnx"
    code, out, err = _run(str(planned), "--inputs", str(stream), "--requests", "20", mode, "--model", str(model),
                          "--json")  # fmt: skip
    assert code == 0, out + err
    result = json.loads(out)
    assert result["mode"] == mode.removeprefix("--")
    assert result["requests"] == 20
    assert result["throughputPerS"] > 0
    assert 0 < result["latencyMs"]["p50"] <= result["latencyMs"]["p95"]
    assert result["checkedInputs"] == 6  # every distinct sample, bit for bit against the whole model
    assert result["planId"] == hashlib.sha256((planned / "plan.json").read_bytes()).hexdigest()
    assert result["tailExecutionProvider"] == "CPUExecutionProvider"  # no TensorRT here
    code, out, err = _run(str(planned), "--inputs", str(stream), "--requests", "3")
    assert code == 0, out + err
    assert "pipelined: 3 requests" in err
    assert "second CPU session" in err


def test_run_refuses_bad_inputs(planned: Path, tmp_path: Path) -> None:
    stream = planned.parent / "stream.npz"
    code, _, err = _run(str(tmp_path / "nowhere"), "--inputs", str(stream))
    assert code == 1
    assert "not a `partition plan --out` folder" in err
    np.savez(tmp_path / "wrong.npz", other=np.zeros((2, 1, 8, 8), np.float32))
    code, _, err = _run(str(planned), "--inputs", str(tmp_path / "wrong.npz"))
    assert code == 1
    assert "needs ['input']" in err
    (tmp_path / "junk.npz").write_text("junk", encoding="utf-8")
    code, _, err = _run(str(planned), "--inputs", str(tmp_path / "junk.npz"))
    assert code == 1
    assert "not an NPZ" in err
    other = _model(tmp_path, tiny_cnn(seed=9), "other")
    code, _, err = _run(str(planned), "--inputs", str(stream), "--model", str(other))
    assert code == 1
    assert "not the model the plan was made for" in err
