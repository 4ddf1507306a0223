"""The AcceleratorStage server and RemoteStage over real grpc.aio on loopback, with real ONNX Runtime."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import pytest_asyncio
from grpc import aio
from onnx import TensorProto, helper

from edgefleet_agent.accel_server import TensorAssembler, start_accel_server, tensor_chunks
from edgefleet_agent.errors import InvalidTensors
from edgefleet_agent.inference_server import CHUNK_DATA_BYTES
from edgefleet_agent.pipeline import LocalStage
from edgefleet_agent.remote_stage import AcceleratorUnavailable, RemoteStage, StageRejected, place_model
from edgefleet_core.partition.cuts import enumerate_cuts, split_model
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc
from tests.support.tiny_models import tiny_cnn, tiny_inputs, wide_mlp

pytestmark = pytest.mark.integration
CPU = ["CPUExecutionProvider"]
WIDTH = 1024
ROWS = 600  # 600 × 1024 float32 = 2.4 MB: three chunks each way


def relu_model() -> bytes:
    """Relu over [N, WIDTH]: its output is as large as its input."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class Server:
    target: str
    models: Path
    server: aio.Server


@pytest_asyncio.fixture
async def accel(tmp_path: Path) -> AsyncIterator[Server]:
    models = tmp_path / "models"
    models.mkdir()
    server, port = await start_accel_server(models, "127.0.0.1:0", providers=CPU)
    yield Server(f"127.0.0.1:{port}", models, server)
    await server.stop(None)


@pytest_asyncio.fixture
async def stub(accel: Server) -> AsyncIterator[inference_pb2_grpc.AcceleratorStageAsyncStub]:
    async with aio.insecure_channel(accel.target) as channel:
        yield inference_pb2_grpc.AcceleratorStageStub(channel)


def stage_requests(stage_id: str, sequence: int, **tensors: np.ndarray) -> Iterator[inference_pb2.StageRequest]:
    groups = list(tensor_chunks(tensors.items()))
    for index, group in enumerate(groups):
        yield inference_pb2.StageRequest(
            stage_id=stage_id, sequence=sequence, inputs=group, chunk_index=index, more_chunks=index < len(groups) - 1
        )


async def load(
    stub: inference_pb2_grpc.AcceleratorStageAsyncStub, models: Path, model: bytes, stage_id: str = "s1"
) -> inference_pb2.LoadStageResponse:
    digest = place_model(models, model)
    request = inference_pb2.LoadStageRequest(stage_id=stage_id, model_sha256=digest, execution_providers=CPU)
    response: inference_pb2.LoadStageResponse = await stub.LoadStage(request)
    return response


def tiny_split() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = tiny_cnn()
    cuts = enumerate_cuts(model)
    split = split_model(model, cuts[len(cuts) // 2])
    return split.head, split.tail


@pytest.mark.asyncio
async def test_remote_tail_is_bit_identical_to_the_local_tail(accel: Server) -> None:
    for model, cut_index, inputs in [
        (tiny_cnn(), None, {"input": tiny_inputs(16)}),
        (wide_mlp(), ["a0"], {"x": np.random.default_rng(2).normal(0, 1, (ROWS, 64)).astype(np.float32)}),
    ]:
        cut = cut_index if cut_index is not None else enumerate_cuts(model)[len(enumerate_cuts(model)) // 2]
        split = split_model(model, cut)
        head = LocalStage(split.head.SerializeToString(), CPU)
        tail = LocalStage(split.tail.SerializeToString(), CPU)
        remote = await asyncio.to_thread(
            RemoteStage, accel.target, split.tail.SerializeToString(), models_dir=accel.models, providers=CPU
        )
        try:
            assert remote.execution_provider == "CPUExecutionProvider"
            values = {**inputs, **head.run(inputs)}
            for _ in range(3):  # the same long-lived stream serves every call
                got = await asyncio.to_thread(remote.run, values)
                want = tail.run(values)
                assert got.keys() == want.keys()
                for name, array in want.items():
                    assert got[name].dtype == array.dtype
                    assert np.array_equal(got[name], array)
        finally:
            await asyncio.to_thread(remote.close)


@pytest.mark.asyncio
async def test_large_tensors_are_chunked_both_ways(
    accel: Server, stub: inference_pb2_grpc.AcceleratorStageAsyncStub
) -> None:
    loaded = await load(stub, accel.models, relu_model())
    assert [(s.name, list(s.shape)) for s in loaded.inputs] == [("x", [-1, WIDTH])]
    x = np.random.default_rng(0).normal(0, 1, (ROWS, WIDTH)).astype(np.float32)
    requests = list(stage_requests("s1", 0, x=x))
    assert len(requests) == 3
    assert all(sum(len(t.data) for t in r.inputs) <= CHUNK_DATA_BYTES for r in requests)
    responses = [r async for r in stub.RunStage(iter(requests))]
    assert [r.chunk_index for r in responses] == [0, 1, 2]
    assert [r.more_chunks for r in responses] == [True, True, False]
    assert all(sum(len(t.data) for t in r.outputs) <= CHUNK_DATA_BYTES for r in responses)
    assert responses[-1].compute_duration.ToNanoseconds() > 0
    assembler = TensorAssembler()
    for response in responses:
        assembler.add(response.outputs)
    assert np.array_equal(assembler.finish()["y"], np.maximum(x, 0))
    # And through RemoteStage, pipelined from several threads at once: answers match their requests.
    remote = await asyncio.to_thread(RemoteStage, accel.target, relu_model(), models_dir=accel.models, max_in_flight=3)
    try:
        batches = [x * k for k in (1.0, -1.0, 2.0, -3.0)]
        futures = [remote.submit({"x": b}) for b in batches]
        for batch, future in zip(batches, futures, strict=True):
            assert np.array_equal((await asyncio.wrap_future(future))["y"], np.maximum(batch, 0))
    finally:
        await asyncio.to_thread(remote.close)


@pytest.mark.asyncio
async def test_failed_sequences_do_not_end_the_stream(
    accel: Server, stub: inference_pb2_grpc.AcceleratorStageAsyncStub
) -> None:
    _, tail = tiny_split()
    loaded = await load(stub, accel.models, tail.SerializeToString())
    [spec] = loaded.inputs
    good_shape = [2 if d < 0 else d for d in spec.shape]
    good = np.ones(good_shape, np.float32)
    requests = [
        *stage_requests("s1", 0, **{spec.name: good.astype(np.float64)}),  # wrong dtype
        *stage_requests("s1", 1, **{spec.name: np.ones([*good_shape, 1], np.float32)}),  # wrong rank
        *stage_requests("s1", 2, nope=good),  # unknown name
        inference_pb2.StageRequest(  # data that does not fill the shape
            stage_id="s1",
            sequence=3,
            inputs=[inference_pb2.Tensor(name=spec.name, dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[2], data=b"x")],
        ),
        *stage_requests("s1", 4, **{spec.name: good}),
    ]
    responses = [r async for r in stub.RunStage(iter(requests))]
    assert [r.sequence for r in responses] == [0, 1, 2, 3, 4]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.error.code for r in responses[:4]] == [invalid] * 4
    assert "float32" in responses[0].error.message
    assert spec.name in responses[1].error.message
    assert not responses[4].HasField("error")
    assert len(responses[4].outputs) == len(loaded.outputs)
    # Through RemoteStage a failed sequence is the agent's InvalidTensors, and the stage goes on.
    remote = await asyncio.to_thread(RemoteStage, accel.target, tail.SerializeToString(), models_dir=accel.models)
    try:
        with pytest.raises(InvalidTensors):
            await asyncio.to_thread(remote.run, {spec.name: good.astype(np.float64)})
        assert set(await asyncio.to_thread(remote.run, {spec.name: good})) == {o.name for o in loaded.outputs}
    finally:
        await asyncio.to_thread(remote.close)


@pytest.mark.asyncio
async def test_stream_protocol_violations_end_it(
    accel: Server, stub: inference_pb2_grpc.AcceleratorStageAsyncStub
) -> None:
    with pytest.raises(aio.AioRpcError) as unknown:
        _ = [r async for r in stub.RunStage(iter(stage_requests("nope", 0, x=np.ones((1, WIDTH), np.float32))))]
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    await load(stub, accel.models, relu_model())
    with pytest.raises(aio.AioRpcError) as skipped:
        _ = [r async for r in stub.RunStage(iter(stage_requests("s1", 5, x=np.ones((1, WIDTH), np.float32))))]
    assert skipped.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_load_stage_status_codes(accel: Server, stub: inference_pb2_grpc.AcceleratorStageAsyncStub) -> None:
    model = relu_model()
    digest = hashlib.sha256(model).hexdigest()

    async def code(request: inference_pb2.LoadStageRequest) -> grpc.StatusCode:
        with pytest.raises(aio.AioRpcError) as failed:
            await stub.LoadStage(request)
        return failed.value.code()

    assert await code(inference_pb2.LoadStageRequest(stage_id="a", model_sha256=digest)) == grpc.StatusCode.NOT_FOUND
    assert (
        await code(inference_pb2.LoadStageRequest(stage_id="a", model_sha256="x")) == grpc.StatusCode.INVALID_ARGUMENT
    )
    (accel.models / f"{digest}.onnx").write_bytes(model + b"\x00")
    assert await code(inference_pb2.LoadStageRequest(stage_id="a", model_sha256=digest)) == grpc.StatusCode.DATA_LOSS
    (accel.models / f"{digest}.onnx").write_bytes(model)
    no_provider = inference_pb2.LoadStageRequest(
        stage_id="a", model_sha256=digest, execution_providers=["NoSuchExecutionProvider"]
    )
    assert await code(no_provider) == grpc.StatusCode.FAILED_PRECONDITION
    first = await stub.LoadStage(inference_pb2.LoadStageRequest(stage_id="a", model_sha256=digest, max_in_flight=99))
    again = await stub.LoadStage(inference_pb2.LoadStageRequest(stage_id="a", model_sha256=digest))
    assert first.max_in_flight == 8
    assert first.execution_provider == "CPUExecutionProvider"
    assert first.load_duration.ToNanoseconds() > 0
    assert again.load_duration.ToNanoseconds() == 0
    other = place_model(accel.models, tiny_split()[1].SerializeToString())
    assert (
        await code(inference_pb2.LoadStageRequest(stage_id="a", model_sha256=other)) == grpc.StatusCode.ALREADY_EXISTS
    )
    # RemoteStage turns a refusal into StageRejected with the code.
    with pytest.raises(StageRejected) as rejected:
        await asyncio.to_thread(RemoteStage, accel.target, model, models_dir=accel.models, providers=["NoSuchEP"])
    assert rejected.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.asyncio
async def test_unload_ends_open_streams_with_aborted(
    accel: Server, stub: inference_pb2_grpc.AcceleratorStageAsyncStub
) -> None:
    await load(stub, accel.models, relu_model())
    call = stub.RunStage()
    for request in stage_requests("s1", 0, x=np.ones((2, WIDTH), np.float32)):
        await call.write(request)
    first = await call.read()
    assert isinstance(first, inference_pb2.StageResponse)
    assert first.sequence == 0
    await stub.UnloadStage(inference_pb2.UnloadStageRequest(stage_id="s1"))
    await stub.UnloadStage(inference_pb2.UnloadStageRequest(stage_id="s1"))  # idempotent
    with pytest.raises(aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.ABORTED


@pytest.mark.asyncio
async def test_a_stopped_server_is_a_typed_error(accel: Server) -> None:
    remote = await asyncio.to_thread(RemoteStage, accel.target, relu_model(), models_dir=accel.models, timeout=10.0)
    x = {"x": np.ones((1, WIDTH), np.float32)}
    try:
        assert (await asyncio.to_thread(remote.run, x))["y"].shape == (1, WIDTH)
        await accel.server.stop(None)
        with pytest.raises(AcceleratorUnavailable):
            await asyncio.to_thread(remote.run, x)
        with pytest.raises(AcceleratorUnavailable):  # and stays so, without waiting for a timeout
            await asyncio.to_thread(remote.run, x)
    finally:
        await asyncio.to_thread(remote.close)
    with pytest.raises(AcceleratorUnavailable):
        await asyncio.to_thread(RemoteStage, accel.target, relu_model(), models_dir=accel.models, timeout=2.0)


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edgefleet_core.cli", "accel-server", "serve", "--models", str(tmp_path)]
    with subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            line = process.stdout.readline()  # blocks until the ready line (or EOF if it died)
            assert line.startswith("accel-server listening 127.0.0.1:"), line
            assert int(line.rsplit(":", 1)[1]) > 0
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
