"""Pipelined head/tail execution: exact outputs, order, backpressure, errors, close, real overlap, the runtime."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet_agent.errors import InferenceFailed, InvalidTensors, ModelLoadError
from edgefleet_agent.pipeline import (
    LocalStage,
    PipelineClosed,
    PipelinedExecutor,
    PipelineFull,
    SequentialExecutor,
)
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_core.bundle.manifest import BundleManifest
from edgefleet_core.partition.cuts import VERIFY_OPTIMIZATION, SplitModel, enumerate_cuts, run_split, split_model
from tests.support.tiny_models import tiny_cnn, tiny_inputs

WAIT = 10.0
"""Upper bound for an event that must happen; a deadlock fails the test instead of hanging it."""


def branchy() -> onnx.ModelProto:
    """``x`` → MatMul → h; s = Sigmoid(h) (a graph output); y = Relu(h) + ``b`` (``b`` read by the tail only)."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Sigmoid", ["h"], ["s"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Add", ["r", "b"], ["y"]),
        ],
        "branchy",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 5]),
        ],
        [numpy_helper.from_array(rng.normal(0, 1, (6, 5)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def branchy_split() -> SplitModel:
    model = branchy()
    # The cut after Sigmoid and Relu: only r crosses, the head also computes graph output s, and b is forwarded.
    [cut] = [c for c in enumerate_cuts(model) if c.names == ("r",)]
    split = split_model(model, cut)
    assert [t.name for t in split.cut.forwarded] == ["b"]
    assert "s" in [o.name for o in split.head.graph.output]
    return split


def executor_for(split: SplitModel, *, depth: int = 2) -> PipelinedExecutor:
    def stage(model: onnx.ModelProto) -> LocalStage:
        return LocalStage(model.SerializeToString(), ["CPUExecutionProvider"], optimization=VERIFY_OPTIMIZATION)

    return PipelinedExecutor(
        stage(split.head),
        stage(split.tail),
        depth=depth,
        forwarded=[t.name for t in split.cut.forwarded],
        outputs=split.outputs,
    )


def whole_model_outputs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = VERIFY_OPTIMIZATION
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, dict(feed)), strict=True))


def assert_bit_exact(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(want)  # every output, in model order
    for name, value in want.items():
        assert got[name].dtype == value.dtype
        assert got[name].shape == value.shape
        assert got[name].tobytes() == value.tobytes(), name


# --- fakes at our own seam: stages that record and wait on events ---------------------------------


class FakeStage:
    """A stage computing ``fn`` on the request number ``i``; records what it ran, may wait on a gate."""

    def __init__(self, name: str, fn: Callable[[int], int] = lambda i: i) -> None:
        self.execution_provider = f"Fake{name}Provider"
        self.name = name
        self.fn = fn
        self.ran: list[int] = []
        self.started: dict[int, threading.Event] = {}
        self.gates: dict[int, threading.Event] = {}
        self.finished: dict[int, threading.Event] = {}
        self.closed = False
        self._lock = threading.Lock()

    def _event(self, table: dict[int, threading.Event], i: int) -> threading.Event:
        with self._lock:
            return table.setdefault(i, threading.Event())

    def started_event(self, i: int) -> threading.Event:
        return self._event(self.started, i)

    def finished_event(self, i: int) -> threading.Event:
        return self._event(self.finished, i)

    def hold(self, i: int) -> threading.Event:
        """Make request ``i`` wait in this stage until the returned event is set."""
        return self._event(self.gates, i)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        i = int(inputs["i"])
        self.started_event(i).set()
        with self._lock:
            gate = self.gates.get(i)
        if gate is not None:
            assert gate.wait(WAIT)
        self.ran.append(i)
        value = self.fn(i)
        self.finished_event(i).set()
        return {"i": np.asarray(value), f"{self.name}_out": np.asarray(value)}

    def close(self) -> None:
        self.closed = True


def request(i: int) -> dict[str, np.ndarray]:
    return {"i": np.asarray(i)}


def fake_pipeline(head: FakeStage, tail: FakeStage, depth: int = 2) -> PipelinedExecutor:
    return PipelinedExecutor(head, tail, depth=depth, outputs=["head_out", "tail_out"])


def fail_on(bad: int) -> Callable[[int], int]:
    def fn(i: int) -> int:
        if i == bad:
            raise InferenceFailed(f"request {i} fails")
        return i

    return fn


# --- exact outputs ----------------------------------------------------------------------------------


def test_every_cut_of_the_cnn_reproduces_the_whole_model_bit_for_bit_through_the_pipeline() -> None:
    model = tiny_cnn()
    batches = [{"input": tiny_inputs(count=2, seed=seed)} for seed in range(24)]
    expected = [whole_model_outputs(model, feed) for feed in batches]
    cuts = enumerate_cuts(model)
    assert len(cuts) >= 3
    for cut in cuts:
        with executor_for(split_model(model, cut)) as executor:
            futures = [executor.submit(feed) for feed in batches]
            for future, want in zip(futures, expected, strict=True):
                assert_bit_exact(future.result(WAIT), want)


def test_forwarded_inputs_and_head_computed_outputs_come_out_in_model_order() -> None:
    split = branchy_split()
    rng = np.random.default_rng(0)
    batches = [
        {"x": rng.normal(0, 1, (3, 6)).astype(np.float32), "b": rng.normal(0, 1, (3, 5)).astype(np.float32)}
        for _ in range(16)
    ]
    with executor_for(split) as pipelined:
        futures = [pipelined.submit(feed) for feed in batches]
        results = [f.result(WAIT) for f in futures]
    for feed, got in zip(batches, results, strict=True):
        assert list(got) == ["y", "s"]
        assert_bit_exact(got, whole_model_outputs(branchy(), feed))
    with SequentialExecutor(
        LocalStage(split.head.SerializeToString(), ["CPUExecutionProvider"], optimization=VERIFY_OPTIMIZATION),
        LocalStage(split.tail.SerializeToString(), ["CPUExecutionProvider"], optimization=VERIFY_OPTIMIZATION),
        forwarded=["b"],
        outputs=split.outputs,
    ) as sequential:
        for feed, got in zip(batches, results, strict=True):
            assert_bit_exact(sequential.submit(feed).result(), got)


def test_results_keep_submission_order_under_concurrent_submitters() -> None:
    split = branchy_split()
    tail = LocalStage(split.tail.SerializeToString(), ["CPUExecutionProvider"], optimization=VERIFY_OPTIMIZATION)
    seen: list[float] = []

    class RecordingTail:
        execution_provider = tail.execution_provider

        def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(float(inputs["b"][0, 0]))  # each request's b carries its submission number
            return tail.run(inputs)

        def close(self) -> None:
            tail.close()

    head = LocalStage(split.head.SerializeToString(), ["CPUExecutionProvider"], optimization=VERIFY_OPTIMIZATION)
    executor = PipelinedExecutor(head, RecordingTail(), forwarded=["b"], outputs=split.outputs)
    submitted: list[float] = []
    lock = threading.Lock()

    def submitter(client: int) -> list[tuple[dict[str, np.ndarray], Future[dict[str, np.ndarray]]]]:
        mine = []
        rng = np.random.default_rng(client)
        for _ in range(25):
            x = rng.normal(0, 1, (2, 6)).astype(np.float32)
            with lock:
                number = float(len(submitted))
                feed = {"x": x, "b": np.full((2, 5), number, np.float32)}
                mine.append((feed, executor.submit(feed)))
                submitted.append(number)
        return mine

    with ThreadPoolExecutor(4) as pool:
        per_client = list(pool.map(submitter, range(4)))
    for mine in per_client:
        for feed, future in mine:
            assert_bit_exact(future.result(WAIT), whole_model_outputs(branchy(), feed))
    executor.close()
    assert seen == submitted


# --- flow control -----------------------------------------------------------------------------------


def test_submit_blocks_while_depth_requests_wait_and_resumes_when_room_frees() -> None:
    head, tail = FakeStage("head"), FakeStage("tail")
    release = head.hold(0)
    executor = fake_pipeline(head, tail, depth=2)
    first = executor.submit(request(0))
    assert head.started_event(0).wait(WAIT)  # request 0 is in the head; the queue in front is empty
    queued = [executor.submit(request(i), block=False) for i in (1, 2)]
    with pytest.raises(PipelineFull, match="2 requests are already waiting"):
        executor.submit(request(3), block=False)
    entered = threading.Event()
    blocked: list[Future[dict[str, np.ndarray]]] = []

    def blocking_submit() -> None:
        blocked.append(executor.submit(request(3)))
        entered.set()

    thread = threading.Thread(target=blocking_submit)
    thread.start()
    assert not entered.is_set()
    assert not first.done()
    release.set()
    assert entered.wait(WAIT)
    thread.join(WAIT)
    results = [f.result(WAIT) for f in [first, *queued, *blocked]]
    assert [int(r["tail_out"]) for r in results] == [0, 1, 2, 3]
    executor.close()


def test_an_error_in_one_request_goes_to_its_future_only() -> None:
    head, tail = FakeStage("head", fail_on(1)), FakeStage("tail", fail_on(3))
    with fake_pipeline(head, tail) as executor:
        futures = [executor.submit(request(i)) for i in range(5)]
        with pytest.raises(InferenceFailed, match="request 1 fails"):
            futures[1].result(WAIT)
        with pytest.raises(InferenceFailed, match="request 3 fails"):
            futures[3].result(WAIT)
        assert [int(futures[i].result(WAIT)["tail_out"]) for i in (0, 2, 4)] == [0, 2, 4]
    assert tail.ran == [0, 2, 3, 4]  # request 1 never reached the tail; 3 failed in it


def test_a_missing_output_or_input_is_an_error_not_a_hang() -> None:
    with (
        PipelinedExecutor(FakeStage("head"), FakeStage("tail"), outputs=["nowhere"]) as executor,
        pytest.raises(InferenceFailed, match=r"no value for outputs \['nowhere'\]"),
    ):
        executor.submit(request(0)).result(WAIT)
    split = branchy_split()
    with executor_for(split) as executor:
        with pytest.raises(InvalidTensors, match=r"no value for inputs \['x'\]"):
            executor.submit({"b": np.zeros((1, 5), np.float32)}).result(WAIT)
        with pytest.raises(InferenceFailed):  # a wrong shape fails inside ONNX Runtime
            executor.submit({"x": np.zeros((1, 7), np.float32), "b": np.zeros((1, 5), np.float32)}).result(WAIT)
    with pytest.raises(ValueError, match="depth"):
        PipelinedExecutor(FakeStage("head"), FakeStage("tail"), depth=0, outputs=["tail_out"])


def test_close_finishes_pending_work_then_refuses_new_requests() -> None:
    head, tail = FakeStage("head"), FakeStage("tail")
    release = head.hold(0)
    executor = fake_pipeline(head, tail)
    futures = [executor.submit(request(i)) for i in range(3)]
    assert head.started_event(0).wait(WAIT)
    closer = threading.Thread(target=executor.close)
    closer.start()
    assert not futures[0].done()
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert [int(f.result(0)["tail_out"]) for f in futures] == [0, 1, 2]
    assert head.closed
    assert tail.closed
    with pytest.raises(PipelineClosed):
        executor.submit(request(3))
    executor.close()  # twice is fine


def test_the_head_of_the_next_request_runs_while_the_tail_of_the_previous_one_does() -> None:
    head, tail = FakeStage("head"), FakeStage("tail")
    tail_may_finish = tail.hold(0)
    with fake_pipeline(head, tail) as executor:
        first = executor.submit(request(0))
        second = executor.submit(request(1))
        assert tail.started_event(0).wait(WAIT)
        assert head.finished_event(1).wait(WAIT)  # head(1) ran to the end ...
        assert not tail.finished_event(0).is_set()  # ... while tail(0) was still running
        assert not first.done()
        tail_may_finish.set()
        assert [int(f.result(WAIT)["tail_out"]) for f in (first, second)] == [0, 1]


def test_a_cancelled_waiting_request_is_skipped() -> None:
    head, tail = FakeStage("head"), FakeStage("tail")
    release = head.hold(0)
    with fake_pipeline(head, tail) as executor:
        first = executor.submit(request(0))
        assert head.started_event(0).wait(WAIT)
        cancelled = executor.submit(request(1))
        last = executor.submit(request(2))
        assert cancelled.cancel()
        release.set()
        assert [int(f.result(WAIT)["tail_out"]) for f in (first, last)] == [0, 2]
    assert head.ran == [0, 2]


@pytest.mark.asyncio
async def test_submit_async_waits_for_room_without_blocking_the_event_loop() -> None:
    head, tail = FakeStage("head"), FakeStage("tail")
    release = head.hold(0)
    with fake_pipeline(head, tail, depth=1) as executor:
        tasks = [asyncio.create_task(executor.submit_async(request(i))) for i in range(5)]
        assert await asyncio.to_thread(head.started_event(0).wait, WAIT)
        # The pipeline is full and submitters wait; the loop still runs other work.
        for _ in range(10):
            await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert sorted(int(r["tail_out"]) for r in results) == [0, 1, 2, 3, 4]


@pytest.mark.asyncio
async def test_sequential_executor_has_the_same_interface() -> None:
    with SequentialExecutor(FakeStage("head"), FakeStage("tail", fail_on(1)), outputs=["tail_out"]) as executor:
        assert executor.execution_providers == ("FakeheadProvider", "FaketailProvider")
        assert int((await executor.submit_async(request(0)))["tail_out"]) == 0
        with pytest.raises(InferenceFailed):
            executor.submit(request(1)).result()
        staged = executor.submit_timed(request(2)).result()
        assert [stage for stage, _ in staged.timings] == ["head", "tail"]
    with pytest.raises(PipelineClosed):
        executor.submit(request(3))


# --- the runtime ------------------------------------------------------------------------------------


def split_files(split: SplitModel) -> dict[str, bytes]:
    return {"head.onnx": split.head.SerializeToString(), "tail.onnx": split.tail.SerializeToString()}


def test_the_runtime_serves_a_head_and_tail_slot_through_the_pipeline() -> None:
    model = tiny_cnn()
    split = split_model(model, enumerate_cuts(model)[1])
    runtime = ModelRuntime()
    loaded = runtime.load("vision", "cnn", "1.0.0", split_files(split), slot="a")
    assert [i.name for i in loaded.inputs] == ["input"]
    assert [o.name for o in loaded.outputs] == ["logits"]
    assert runtime.self_test(loaded, None) is None
    runtime.activate(loaded)
    batches = [tiny_inputs(count=1, seed=seed) for seed in range(40)]

    def client(seed: int) -> None:
        feed = {"input": batches[seed]}
        prediction = runtime.predict("cnn", feed, namespace="vision")
        [(name, logits)] = prediction.outputs
        # The same sessions (optimized, one thread) as run_split's: bit for bit.
        want = run_split(split, feed)["logits"]
        assert (name, logits.tobytes()) == ("logits", want.tobytes())
        assert [stage for stage, _ in prediction.timings] == ["head", "tail", "total"]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(len(batches))))
    [status] = runtime.status("vision", "cnn")
    assert (status.state, status.execution_providers) == ("ready", ("CPUExecutionProvider", "CPUExecutionProvider"))
    [window] = runtime.drain_windows()
    assert (window.inference_count, window.error_count, window.accelerator_fallback_count) == (40, 0, 0)
    loaded.close()


def test_a_plan_naming_an_absent_accelerator_runs_the_tail_on_the_cpu_and_counts_fallbacks() -> None:
    split = branchy_split()
    plan = {"headExecutionProvider": "CPUExecutionProvider", "tailExecutionProvider": "NoSuchExecutionProvider"}
    # The runtime reads only the plan from a manifest; the rest of one is the bundle tests' business.
    fields: dict[str, Any] = {"partition_plan": plan}
    manifest = BundleManifest.model_construct(**fields)
    runtime = ModelRuntime()
    loaded = runtime.load("vision", "branchy", "1.0.0", split_files(split), slot="a", manifest=manifest)
    assert [i.name for i in loaded.inputs] == ["x", "b"]
    assert loaded.degraded
    runtime.activate(loaded)
    feed = {"x": np.ones((1, 6), np.float32), "b": np.ones((1, 5), np.float32)}
    prediction = runtime.predict("branchy", feed, ["y"], namespace="vision")
    assert [name for name, _ in prediction.outputs] == ["y"]
    [status] = runtime.status("vision", "branchy")
    assert (status.state, status.execution_providers) == (
        "degraded",
        ("CPUExecutionProvider", "CPUExecutionProvider"),
    )
    [window] = runtime.drain_windows()
    assert window.accelerator_fallback_count == 1
    loaded.close()


def test_a_model_with_external_data_is_refused_before_onnx_runtime_reads_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given as bytes, ONNX Runtime would resolve external data against the working folder."""
    model = tiny_cnn()
    [weight] = [t for t in model.graph.initializer if t.name == "conv_w"]
    (tmp_path / "w.bin").write_bytes(weight.raw_data or numpy_helper.to_array(weight).tobytes())
    length = (tmp_path / "w.bin").stat().st_size
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="tensor 'conv_w' uses external data"):
        LocalStage(model.SerializeToString(), ["CPUExecutionProvider"], label="tail")
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="uses external data"):
        LocalStage(tmp_path / "model.onnx", ["CPUExecutionProvider"], label="tail")
