"""The demo's inference traffic against a stand-in of the agent's Inference API (our own proto)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet_operator.demo.inference import InferenceDriver, Sample, load_samples
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[4]
NOT_SERVING = 3
"""The stand-in answers "not found" (nothing installed) to this many requests first."""


class FakeAgent(inference_pb2_grpc.InferenceServicer):
    """Answers label 1 for images whose first pixel is positive, else 0; every fifth request fails."""

    def __init__(self) -> None:
        self.seen = 0

    def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> inference_pb2.PredictResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the demo streams")

    def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GetModelStatusResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the demo")

    def PredictStream(
        self, request_iterator: Iterator[inference_pb2.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.PredictResponse]:
        for request in request_iterator:
            self.seen += 1
            if self.seen <= NOT_SERVING:
                error = inference_pb2.RequestError(code=grpc.StatusCode.NOT_FOUND.value[0], message="no model")
                yield inference_pb2.PredictResponse(request_id=request.request_id, error=error)
                continue
            if self.seen % 5 == 0:
                error = inference_pb2.RequestError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad input")
                yield inference_pb2.PredictResponse(request_id=request.request_id, error=error)
                continue
            image = np.frombuffer(request.inputs[0].data, "<f4")
            logits = np.array([0.0, 1.0] if image[0] > 0 else [1.0, 0.0], dtype="<f4")
            timing = inference_pb2.StageTiming(stage="run")
            timing.duration.FromNanoseconds(100_000)
            output = inference_pb2.Tensor(name="logits", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[1, 2],
                                          data=logits.tobytes())  # fmt: skip
            yield inference_pb2.PredictResponse(
                request_id=request.request_id, model_version="1", outputs=[output], timings=[timing]
            )


@pytest.fixture
def agent_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeAgent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_the_driver_counts_answers_errors_and_right_labels(agent_address: str) -> None:
    samples = (Sample(np.ones((1, 1, 8, 8), np.float32), 1), Sample(np.zeros((1, 1, 8, 8), np.float32), 1))
    driver = InferenceDriver("edge-cpu-1", agent_address, samples, model_name="digits", pace_s=0.0)
    before = driver.last_version
    driver.start()
    try:
        deadline = time.monotonic() + 30
        while driver.successes_on("1") < 40:
            assert time.monotonic() < deadline, driver.last_error
            time.sleep(0.02)
    finally:
        driver.stop()
    stats = driver.stats()["1"]
    assert (before, driver.last_version) == (None, "1")
    assert "?" not in driver.stats()  # "not found" before a model is installed is waiting, not an error
    answered = stats.requests - stats.errors
    assert stats.errors == pytest.approx(stats.requests / 5, abs=2)
    assert len(stats.latencies_ms) == answered
    assert all(ms > 0 for ms in stats.latencies_ms)
    # Alternating samples: the first is labelled right, the second wrong.
    assert stats.correct == pytest.approx(answered / 2, abs=2)
    assert stats.stage_ms["run"] == pytest.approx(0.1 * answered)


def test_the_driver_keeps_trying_an_agent_that_is_not_there_yet() -> None:
    samples = (Sample(np.ones((1, 1, 8, 8), np.float32), 1),)
    driver = InferenceDriver("edge-cpu-1", "127.0.0.1:1", samples, model_name="digits")
    driver.start()
    deadline = time.monotonic() + 30
    while not driver.last_error:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    driver.stop()
    assert driver.stats() == {}


def test_samples_come_from_the_evaluation_data() -> None:
    samples = load_samples(str(ROOT / "examples" / "models" / "digits-small-cnn-data.npz"))
    assert len(samples) == 360
    assert samples[0].image.shape == (1, 1, 8, 8)
    assert {s.label for s in samples} == set(range(10))
    with pytest.raises(ValueError, match="no samples"):
        InferenceDriver("x", "127.0.0.1:1", (), model_name="digits")
