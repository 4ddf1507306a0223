"""The local Inference API over real grpc.aio on loopback: Predict, PredictStream with chunking, status."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc import aio

from edgefleet_agent.inference_server import CHUNK_DATA_BYTES, start_inference_server, tensor_message
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_proto.v1 import fleet_pb2, inference_pb2, inference_pb2_grpc
from tests.unit.agent.bundle_world import model_bytes, wide_identity

pytestmark = pytest.mark.integration
NS = "vision"
WIDE = 600_000  # 2.4 MB per row of float32: three chunks
INPUT = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    runtime = ModelRuntime()
    runtime.activate(runtime.load(NS, "digits", "1.0.0", {"model.onnx": model_bytes(0)}, slot="a"))
    runtime.activate(runtime.load(NS, "wide", "1", {"model.onnx": wide_identity(WIDE)}, slot="b"))
    server, port = await start_inference_server(runtime, NS, "127.0.0.1:0")
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield inference_pb2_grpc.InferenceStub(channel)
    await server.stop(None)


def request(model: str = "digits", request_id: str = "", **tensors: np.ndarray) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(
        request_id=request_id, model_name=model, inputs=[tensor_message(n, a) for n, a in tensors.items()]
    )


@pytest.mark.asyncio
async def test_predict_and_its_status_codes(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    response = await stub.Predict(request(request_id="r1", input=INPUT))
    assert (response.request_id, response.model_version) == ("r1", "1.0.0")
    [logits] = response.outputs
    assert (logits.name, logits.dtype, list(logits.shape)) == ("logits", inference_pb2.DATA_TYPE_FLOAT, [1, 10])
    assert len(logits.data) == 40
    assert [t.stage for t in response.timings] == ["run", "total"]
    bad = [
        (request("nope", input=INPUT), grpc.StatusCode.NOT_FOUND),
        (inference_pb2.PredictRequest(model_name="digits", model_version="9", inputs=[tensor_message("input", INPUT)]),
         grpc.StatusCode.FAILED_PRECONDITION),
        (request(input=INPUT.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT),
        (request(), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="digits", inputs=[inference_pb2.Tensor(
            name="input", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[1, 1, 8, 8], data=b"short")]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="digits", inputs=[inference_pb2.Tensor(
            name="input", dtype=inference_pb2.DATA_TYPE_UNSPECIFIED, shape=[1])]), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="digits", inputs=[inference_pb2.Tensor(
            name="input", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[-1])]), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="digits", more_chunks=True), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="", request_id="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.PredictRequest(model_name="digits", request_id="x" * 129), grpc.StatusCode.INVALID_ARGUMENT),
    ]  # fmt: skip
    for message, code in bad:
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.Predict(message)
        assert caught.value.code() == code, message


@pytest.mark.asyncio
async def test_stream_answers_in_order_and_survives_bad_requests(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    messages = [request(request_id=f"r{i}", input=INPUT * i) for i in range(8)]
    messages.insert(3, request("nope", request_id="bad", input=INPUT))
    call = stub.PredictStream(iter(messages))
    responses = [r async for r in call]
    assert [r.request_id for r in responses] == [m.request_id for m in messages]
    failed = responses[3]
    assert failed.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not failed.outputs
    assert all(not r.HasField("error") and r.model_version == "1.0.0" for i, r in enumerate(responses) if i != 3)


@pytest.mark.asyncio
async def test_stream_reassembles_chunked_requests_and_chunks_responses(
    stub: inference_pb2_grpc.InferenceAsyncStub,
) -> None:
    x = np.random.default_rng(1).normal(0, 1, (1, WIDE)).astype(np.float32)
    whole = tensor_message("x", x)
    pieces = [whole.data[i : i + CHUNK_DATA_BYTES] for i in range(0, len(whole.data), CHUNK_DATA_BYTES)]
    chunked = [
        inference_pb2.PredictRequest(
            request_id="big",
            model_name="wide",
            inputs=[inference_pb2.Tensor(name="x", dtype=whole.dtype, shape=whole.shape, data=piece)],
            chunk_index=index,
            more_chunks=index < len(pieces) - 1,
        )
        for index, piece in enumerate(pieces)
    ]
    out_of_order = [copy.deepcopy(chunked[0]), copy.deepcopy(chunked[2])]
    out_of_order[1].request_id = "big"
    messages = [*out_of_order, *chunked, request(request_id="small", input=INPUT)]
    responses = [r async for r in stub.PredictStream(iter(messages))]
    assert responses[0].request_id == "big"
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    big = [r for r in responses[1:] if r.request_id == "big"]
    assert len(big) == len(pieces)
    assert [r.chunk_index for r in big] == list(range(len(pieces)))
    assert [r.more_chunks for r in big] == [True] * (len(pieces) - 1) + [False]
    assert all(sum(len(t.data) for t in r.outputs) <= CHUNK_DATA_BYTES for r in big)
    assert not any(r.timings for r in big[:-1])
    assert big[-1].timings[-1].stage == "total"
    data = b"".join(t.data for r in big for t in r.outputs)
    np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(1, WIDE), np.maximum(x, 0))
    assert responses[-1].request_id == "small"
    assert not responses[-1].HasField("error")


@pytest.mark.asyncio
async def test_stream_ending_inside_a_chunked_request_gets_an_error(
    stub: inference_pb2_grpc.InferenceAsyncStub,
) -> None:
    cut = inference_pb2.PredictRequest(request_id="cut", model_name="digits", more_chunks=True)
    [response] = [r async for r in stub.PredictStream(iter([cut]))]
    assert response.request_id == "cut"
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.asyncio
async def test_model_status(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    everything = await stub.GetModelStatus(inference_pb2.GetModelStatusRequest())
    assert [m.model_name for m in everything.models] == ["digits", "wide"]
    [digits] = (await stub.GetModelStatus(inference_pb2.GetModelStatusRequest(model_name="digits"))).models
    assert digits.state == inference_pb2.MODEL_STATE_READY
    assert (digits.active_version, digits.active_slot) == ("1.0.0", fleet_pb2.SLOT_A)
    assert [(s.name, list(s.shape)) for s in digits.inputs] == [("input", [-1, 1, 8, 8])]
    assert list(digits.execution_providers) == ["CPUExecutionProvider"]
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetModelStatus(inference_pb2.GetModelStatusRequest(model_name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_unix_socket(tmp_path: object) -> None:
    runtime = ModelRuntime()
    runtime.activate(runtime.load(NS, "digits", "1.0.0", {"model.onnx": model_bytes(0)}, slot="a"))
    path = f"{tmp_path}/inference.sock"
    server, port = await start_inference_server(runtime, NS, f"unix:{path}")
    assert port == 0
    try:
        async with aio.insecure_channel(f"unix:{path}") as channel:
            response = await inference_pb2_grpc.InferenceStub(channel).Predict(request(input=INPUT))
        assert response.model_version == "1.0.0"
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_an_unexpected_failure_is_internal_with_a_generic_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = ModelRuntime()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(runtime, "predict", broken)
    server, port = await start_inference_server(runtime, NS, "127.0.0.1:0")
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.Predict(request(request_id="r1", input=INPUT))
        assert refused.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (refused.value.details() or "")
        answers = [r async for r in stub.PredictStream(iter([request(request_id="s1", input=INPUT)]))]
        assert [(a.request_id, a.error.code) for a in answers] == [("s1", grpc.StatusCode.INTERNAL.value[0])]
        assert "secret" not in answers[0].error.message
    await server.stop(None)
    assert "secret detail" in caplog.text


def test_a_stream_budget_pauses_the_reader_until_requests_finish() -> None:
    import asyncio

    from edgefleet_agent.inference_server import _Budget

    async def scenario() -> list[str]:
        budget = _Budget(10)
        events: list[str] = []
        budget.take(10)

        async def reader() -> None:
            await budget.wait_for_room()
            events.append("read")

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        events.append("released")
        budget.give(4)
        await task
        return events

    assert asyncio.run(scenario()) == ["released", "read"]
