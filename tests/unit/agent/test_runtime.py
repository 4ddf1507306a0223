"""ModelRuntime: loading, input validation, head/tail, self-tests, hot swap under load, window statistics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgefleet_agent.errors import InvalidTensors, ModelLoadError, ModelNotReady, UnknownModel
from edgefleet_agent.runtime import LoadedModel, ModelRuntime
from edgefleet_core.bundle.selftest import make_self_test
from tests.unit.agent.bundle_world import head_tail, model_bytes

NS = "vision"
INPUT = np.random.default_rng(0).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)


def load(runtime: ModelRuntime, version: str, seed: int, name: str = "digits") -> LoadedModel:
    return runtime.load(NS, name, version, {"model.onnx": model_bytes(seed)}, slot="a" if seed % 2 == 0 else "b")


@pytest.fixture
def runtime() -> ModelRuntime:
    made = ModelRuntime()
    made.activate(load(made, "1.0.0", 0))
    return made


def test_predict_serves_the_active_version_and_validates_inputs(runtime: ModelRuntime) -> None:
    result = runtime.predict("digits", {"input": INPUT}, namespace=NS)
    assert result.version == "1.0.0"
    [(name, logits)] = result.outputs
    assert (name, logits.shape, logits.dtype.name) == ("logits", (2, 10), "float32")
    assert [stage for stage, _ in result.timings] == ["run", "total"]
    cases: list[tuple[dict[str, np.ndarray], list[str], str]] = [
        ({}, [], "missing"),
        ({"input": INPUT, "extra": INPUT}, [], "unknown"),
        ({"input": INPUT.astype(np.float64)}, [], "float64"),
        ({"input": INPUT[:, :, :4]}, [], "shape"),
        ({"input": INPUT[0]}, [], "shape"),
        ({"input": INPUT}, ["nope"], "unknown"),
        ({"input": INPUT}, ["logits", "logits"], "repeat"),
    ]
    for inputs, outputs, message in cases:
        with pytest.raises(InvalidTensors, match=message):
            runtime.predict("digits", inputs, outputs, namespace=NS)
    with pytest.raises(UnknownModel):
        runtime.predict("other", {"input": INPUT}, namespace=NS)
    with pytest.raises(UnknownModel):
        runtime.predict("digits", {"input": INPUT}, namespace="elsewhere")
    with pytest.raises(ModelNotReady, match="does not hold version"):
        runtime.predict("digits", {"input": INPUT}, version="9", namespace=NS)
    runtime.mark_unavailable(NS, "digits")
    with pytest.raises(ModelNotReady, match="no version ready"):
        runtime.predict("digits", {"input": INPUT}, namespace=NS)


def test_head_and_tail_run_one_after_the_other() -> None:
    runtime = ModelRuntime()
    files = head_tail()
    model = runtime.load(NS, "split", "1", files, slot="a")
    assert [i.name for i in model.inputs] == ["x"]
    assert [o.name for o in model.outputs] == ["y"]
    assert runtime.self_test(model, make_self_test(files)) is None
    runtime.activate(model)
    x = np.ones((3, 16), np.float32)
    result = runtime.predict("split", {"x": x}, namespace=NS)
    assert [stage for stage, _ in result.timings] == ["head", "tail", "total"]
    assert result.outputs[0][1].shape == (3, 4)
    [status] = runtime.status(NS, "split")
    assert status.execution_providers == ("CPUExecutionProvider", "CPUExecutionProvider")


def test_load_refuses_what_onnx_runtime_cannot_load() -> None:
    runtime = ModelRuntime()
    with pytest.raises(ModelLoadError, match="cannot load"):
        runtime.load(NS, "digits", "1", {"model.onnx": b"not a model"})
    with pytest.raises(ModelLoadError, match="not a model"):
        runtime.load(NS, "digits", "1", {"weights.bin": b""})


def test_self_test_checks_outputs_and_latency(runtime: ModelRuntime) -> None:
    model = load(runtime, "2.0.0", 1)
    assert runtime.self_test(model, make_self_test({"model.onnx": model_bytes(1)})) is None
    assert runtime.self_test(model, None) is None
    wrong = runtime.self_test(model, make_self_test({"model.onnx": model_bytes(0)}))
    assert wrong is not None
    assert wrong.reason == "SelfTestOutputs"
    slow = runtime.self_test(model, make_self_test({"model.onnx": model_bytes(1)}, latency_slo_ms=1e-6))
    assert slow is not None
    assert slow.reason == "SelfTestLatency"
    other_inputs = runtime.self_test(model, make_self_test(head_tail()))
    assert other_inputs is not None
    assert "do not fit" in other_inputs.message


def test_hot_swap_under_concurrent_requests_drops_nothing(runtime: ModelRuntime) -> None:
    stop = threading.Event()
    versions: list[str] = []

    def client() -> int:
        served = 0
        while not stop.is_set():
            versions.append(runtime.predict("digits", {"input": INPUT}, namespace=NS).version)
            served += 1
        return served

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        for step, version in enumerate(["2.0.0", "3.0.0", "4.0.0"], start=1):
            model = load(runtime, version, step)
            assert runtime.self_test(model, None) is None
            before = len(versions)
            runtime.activate(model)
            while len(versions) < before + 20:  # requests keep flowing on the new version
                assert all(not f.done() for f in futures)
        stop.set()
        served = sum(f.result() for f in futures)  # re-raises any failed request
    assert served == len(versions)
    # Threads finish in any order: a request started just before the last swap may end last.
    assert "4.0.0" in versions[-20:]
    assert set(versions) <= {"1.0.0", "2.0.0", "3.0.0", "4.0.0"}
    # One entry per version that served, each counting exactly the requests it served; the
    # version active at the end comes last.
    windows = runtime.drain_windows()
    assert windows[-1].version == "4.0.0"
    assert {w.version: w.inference_count for w in windows} == {v: versions.count(v) for v in set(versions)}
    assert sum(w.inference_count for w in windows) == served
    assert all(w.error_count == 0 for w in windows)
    assert all(0 < w.latency_p50_ms <= w.latency_p95_ms <= w.latency_p99_ms for w in windows)
    # The replaced version stays loaded as the previous one and can be pinned.
    assert runtime.predict("digits", {"input": INPUT}, version="3.0.0", namespace=NS).version == "3.0.0"


def test_errors_count_against_the_version_that_served_them_across_a_switch(runtime: ModelRuntime) -> None:
    # Issue 10's known bug: at a switch a window was reported as one entry named after the version
    # active at its end, so the old version's errors counted against the new one (and, after a
    # rollback, the bad version's errors against the good one the rollout compares it with).
    for _ in range(3):
        runtime.predict("digits", {"input": INPUT}, namespace=NS)
    for _ in range(2):
        with pytest.raises(InvalidTensors):
            runtime.predict("digits", {"input": INPUT[0]}, namespace=NS)
    runtime.activate(load(runtime, "2.0.0", 1))
    for _ in range(4):
        runtime.predict("digits", {"input": INPUT}, namespace=NS)
    old, new = runtime.drain_windows()
    assert (old.version, old.slot, old.inference_count, old.error_count) == ("1.0.0", "a", 5, 2)
    assert (new.version, new.slot, new.inference_count, new.error_count) == ("2.0.0", "b", 4, 0)
    assert old.started_at is not None
    assert new.started_at is not None
    assert old.started_at <= new.started_at
    # A request pinned to the previous version after the switch still counts against it.
    with pytest.raises(InvalidTensors):
        runtime.predict("digits", {"input": INPUT[0]}, version="1.0.0", namespace=NS)
    old, new = runtime.drain_windows()
    assert (old.version, old.inference_count, old.error_count) == ("1.0.0", 1, 1)
    assert (new.version, new.inference_count, new.error_count) == ("2.0.0", 0, 0)


def test_windows_count_errors_and_reset(runtime: ModelRuntime) -> None:
    runtime.predict("digits", {"input": INPUT}, namespace=NS)
    with pytest.raises(InvalidTensors):
        runtime.predict("digits", {"input": INPUT[0]}, namespace=NS)
    [window] = runtime.drain_windows()
    assert (window.version, window.slot, window.inference_count, window.error_count) == ("1.0.0", "a", 2, 1)
    assert window.accelerator_fallback_count == 0
    [idle] = runtime.drain_windows()  # a served model reports every window, even an idle one
    assert (idle.inference_count, idle.latency_p95_ms) == (0, 0.0)
    assert runtime.served() == [(NS, "digits", "1.0.0", "a")]
    runtime.unload(NS, "digits")
    assert runtime.served() == []
    assert runtime.drain_windows() == []


def test_a_missing_accelerator_degrades_to_the_cpu() -> None:
    runtime = ModelRuntime(("NoSuchExecutionProvider", "CPUExecutionProvider"))
    model = load(runtime, "1.0.0", 0)
    assert model.degraded
    runtime.activate(model)
    runtime.predict("digits", {"input": INPUT}, namespace=NS)
    [status] = runtime.status(NS)
    assert (status.state, status.execution_providers) == ("degraded", ("CPUExecutionProvider",))
    [window] = runtime.drain_windows()
    assert window.accelerator_fallback_count == 1


def _identity(inp: str, out: str) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", [inp], [out])],
        "g",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_tail_input_the_head_does_not_produce_is_a_forwarded_model_input() -> None:
    # split_model gives the tail the graph inputs it reads directly; the caller provides them.
    runtime = ModelRuntime()
    loaded = runtime.load("demo", "m", "1.0.0", {"head.onnx": _identity("x", "h"), "tail.onnx": _identity("zz", "y")})
    assert [i.name for i in loaded.inputs] == ["x", "zz"]
    assert [o.name for o in loaded.outputs] == ["h", "y"]  # h: a graph output the head computes
    assert runtime.self_test(loaded, None) is None
    runtime.activate(loaded)
    with pytest.raises(InvalidTensors, match=r"missing \['zz'\]"):
        runtime.predict("m", {"x": np.zeros((1, 2), np.float32)}, namespace="demo")
    x, zz = np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)
    result = runtime.predict("m", {"x": x, "zz": zz}, namespace="demo")
    assert [(name, value.tolist()) for name, value in result.outputs] == [("h", x.tolist()), ("y", zz.tolist())]
    loaded.close()


def test_the_previous_version_is_dropped_when_its_slot_is_overwritten() -> None:
    runtime = ModelRuntime()
    files = {"model.onnx": _identity("x", "y")}
    runtime.activate(runtime.load("demo", "m", "1.0.0", files, slot="a"))
    runtime.activate(runtime.load("demo", "m", "2.0.0", files, slot="b"))
    assert runtime.status("demo", "m")[0].previous_version == "1.0.0"
    runtime.forget_slot("demo", "m", "b")  # not the previous one's slot
    assert runtime.status("demo", "m")[0].previous_version == "1.0.0"
    runtime.forget_slot("demo", "m", "a")
    assert runtime.status("demo", "m")[0].previous_version == ""
    with pytest.raises(ModelNotReady):
        runtime.predict("m", {"x": np.zeros((1, 2), np.float32)}, version="1.0.0", namespace="demo")
