"""The device-local ``edgefleet.v1.Inference`` API over grpc.aio, in front of a :class:`ModelRuntime`.

A thin edge: messages become numpy arrays (the ONNX DataType numbering, see inference.proto),
the runtime serves them in a worker thread, and the runtime's typed errors become status codes
(Predict) or per-request ``RequestError``s (PredictStream, where one bad request does not end the
stream). PredictStream reassembles chunked requests, keeps up to :data:`PIPELINE_DEPTH` requests
in flight and answers them in request order; when the pipeline is full it stops reading, which is
gRPC flow control's backpressure on the client. Responses are split so that no message carries
more than 1 MiB of tensor data. Served insecure: it is meant for loopback or a Unix socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio

from edgefleet_agent.errors import InferenceError, InferenceFailed, InvalidTensors, ModelNotReady, UnknownModel
from edgefleet_agent.metrics import UNKNOWN_MODEL
from edgefleet_agent.runtime import ModelRuntime, Prediction, TensorInfo
from edgefleet_proto.v1 import fleet_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
Array = npt.NDArray[Any]
DataType: TypeAlias = inference_pb2.DataType.ValueType

CHUNK_DATA_BYTES: Final = 1 << 20
"""Most tensor data one streamed message carries (inference.proto)."""
UNARY_DATA_BYTES: Final = 4 * (1 << 20) - 64 * 1024
"""Most tensor data a unary response may carry: gRPC's default 4 MiB cap less room for the envelope."""
MAX_STREAM_REQUEST_BYTES: Final = 64 * (1 << 20)
"""Largest reassembled request on PredictStream."""
MAX_STREAM_IN_FLIGHT_BYTES: Final = 64 * (1 << 20)
"""Tensor bytes one stream may have buffered at once (being reassembled, queued or running): when
reached, the stream stops reading until requests finish."""
INTERNAL_MESSAGE: Final = "internal error in the inference server"
"""What a client is told about an unexpected failure (the details are logged, not sent)."""
MAX_REQUEST_ID: Final = 128
MAX_ERROR_MESSAGE: Final = 1024
MAX_TENSORS: Final = 1024
PIPELINE_DEPTH: Final = 4
"""Requests of one stream in flight at once (reassembled and queued or running)."""

DTYPES: Final[dict[DataType, np.dtype[Any]]] = {
    inference_pb2.DATA_TYPE_FLOAT: np.dtype(np.float32),
    inference_pb2.DATA_TYPE_UINT8: np.dtype(np.uint8),
    inference_pb2.DATA_TYPE_INT8: np.dtype(np.int8),
    inference_pb2.DATA_TYPE_INT16: np.dtype(np.int16),
    inference_pb2.DATA_TYPE_INT32: np.dtype(np.int32),
    inference_pb2.DATA_TYPE_INT64: np.dtype(np.int64),
    inference_pb2.DATA_TYPE_BOOL: np.dtype(np.bool_),
    inference_pb2.DATA_TYPE_FLOAT16: np.dtype(np.float16),
    inference_pb2.DATA_TYPE_DOUBLE: np.dtype(np.float64),
}
"""ONNX DataType number → numpy dtype. BFLOAT16 is in the contract but numpy has no such type: refused."""
DATA_TYPES: Final[dict[str, DataType]] = {dtype.name: number for number, dtype in DTYPES.items()}

_MODEL_STATES: Final = {
    "loading": inference_pb2.MODEL_STATE_LOADING,
    "ready": inference_pb2.MODEL_STATE_READY,
    "degraded": inference_pb2.MODEL_STATE_DEGRADED,
    "unavailable": inference_pb2.MODEL_STATE_UNAVAILABLE,
}
_SLOTS: Final = {"a": fleet_pb2.SLOT_A, "b": fleet_pb2.SLOT_B}


class _TooLarge(InferenceError):
    """A request or response is over a size bound (RESOURCE_EXHAUSTED)."""


def status_code(error: InferenceError) -> grpc.StatusCode:
    """The status code of a runtime error (inference.proto's Predict comment)."""
    if isinstance(error, UnknownModel):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, ModelNotReady):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, InvalidTensors):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, _TooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


# --- tensors -----------------------------------------------------------------------------------


def wire_dtype(number: DataType, name: str) -> np.dtype[Any]:
    if number == inference_pb2.DATA_TYPE_UNSPECIFIED:
        raise InvalidTensors(f"tensor {name!r} has no dtype")
    dtype = DTYPES.get(number)
    if dtype is None:
        raise InvalidTensors(f"tensor {name!r} has dtype {number}, which this agent does not support")
    return dtype


def wire_shape(dims: Sequence[int], name: str) -> tuple[int, ...]:
    if any(d < 0 for d in dims):
        raise InvalidTensors(f"tensor {name!r} has a negative dimension in {list(dims)}")
    if len(dims) > 32:
        raise InvalidTensors(f"tensor {name!r} has {len(dims)} dimensions")
    return tuple(int(d) for d in dims)


def to_array(name: str, number: DataType, dims: Sequence[int], data: bytes) -> Array:
    """A numpy array from a whole tensor's fields; :class:`InvalidTensors` if they do not agree."""
    if not name:
        raise InvalidTensors("a tensor has no name")
    dtype = wire_dtype(number, name)
    shape = wire_shape(dims, name)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidTensors(f"tensor {name!r} has {len(data)} bytes of data; shape {list(shape)} needs {expected}")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def tensor_message(name: str, array: Array) -> inference_pb2.Tensor:
    """A whole tensor message from a numpy array."""
    number = DATA_TYPES.get(array.dtype.name)
    if number is None:
        raise InferenceFailed(f"output {name!r} is {array.dtype.name}, which the API cannot carry")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return inference_pb2.Tensor(name=name, dtype=number, shape=list(array.shape), data=data)


def tensor_spec(info: TensorInfo) -> inference_pb2.TensorSpec:
    return inference_pb2.TensorSpec(
        name=info.name,
        dtype=DATA_TYPES.get(info.dtype or "", inference_pb2.DATA_TYPE_UNSPECIFIED),
        shape=[-1 if d is None else d for d in info.shape],
    )


def _timings(prediction: Prediction) -> list[inference_pb2.StageTiming]:
    timings = []
    for stage, seconds in prediction.timings:
        timing = inference_pb2.StageTiming(stage=stage)
        timing.duration.FromNanoseconds(round(seconds * 1e9))
        timings.append(timing)
    return timings


def response_chunks(request_id: str, prediction: Prediction) -> Iterator[inference_pb2.PredictResponse]:
    """The prediction as PredictResponse messages of at most :data:`CHUNK_DATA_BYTES` tensor data each."""
    pieces: list[list[inference_pb2.Tensor]] = [[]]
    room = CHUNK_DATA_BYTES
    for name, array in prediction.outputs:
        whole = tensor_message(name, array)
        offset = 0
        while True:
            if room == 0:
                pieces.append([])
                room = CHUNK_DATA_BYTES
            take = min(room, len(whole.data) - offset)
            piece = inference_pb2.Tensor(name=whole.name, dtype=whole.dtype, shape=whole.shape)
            piece.data = whole.data[offset : offset + take]
            pieces[-1].append(piece)
            offset += take
            room -= take
            if offset >= len(whole.data):
                break
    for index, tensors in enumerate(pieces):
        last = index == len(pieces) - 1
        yield inference_pb2.PredictResponse(
            request_id=request_id,
            model_version=prediction.version,
            outputs=tensors,
            timings=_timings(prediction) if last else [],
            chunk_index=index,
            more_chunks=not last,
        )


def error_response(request_id: str, error: InferenceError) -> inference_pb2.PredictResponse:
    """A PredictStream response for a failed request."""
    return inference_pb2.PredictResponse(
        request_id=request_id,
        error=inference_pb2.RequestError(code=status_code(error).value[0], message=str(error)[:MAX_ERROR_MESSAGE]),
    )


# --- reassembly of chunked requests ------------------------------------------------------------


@dataclass
class _Request:
    """One logical request, whole (unary) or reassembled from chunks (stream)."""

    request_id: str
    model_name: str
    model_version: str
    output_names: list[str]
    pieces: dict[str, tuple[DataType, tuple[int, ...], bytearray]] = field(default_factory=dict)
    size: int = 0

    def inputs(self) -> dict[str, Array]:
        return {name: to_array(name, number, shape, bytes(data)) for name, (number, shape, data) in self.pieces.items()}


def _check_header(message: inference_pb2.PredictRequest) -> None:
    if len(message.request_id) > MAX_REQUEST_ID:
        raise InvalidTensors(f"request_id is {len(message.request_id)} characters, over {MAX_REQUEST_ID}")
    if not message.model_name:
        raise InvalidTensors("model_name is required")
    if len(message.inputs) > MAX_TENSORS or len(message.output_names) > MAX_TENSORS:
        raise InvalidTensors(f"a request carries at most {MAX_TENSORS} tensors and output names")


def _add_pieces(request: _Request, message: inference_pb2.PredictRequest, *, limit: int) -> None:
    for tensor in message.inputs:
        if not tensor.name:
            raise InvalidTensors("a tensor has no name")
        shape = wire_shape(tensor.shape, tensor.name)
        wire_dtype(tensor.dtype, tensor.name)
        request.size += len(tensor.data)
        if request.size > limit:
            raise _TooLarge(f"request {request.request_id!r} carries over {limit} bytes of tensor data")
        held = request.pieces.get(tensor.name)
        if held is None:
            request.pieces[tensor.name] = (tensor.dtype, shape, bytearray(tensor.data))
        elif (held[0], held[1]) != (tensor.dtype, shape):
            raise InvalidTensors(f"pieces of tensor {tensor.name!r} disagree on dtype or shape")
        else:
            held[2].extend(tensor.data)


class _Assembler:
    """Turns a stream's messages into logical requests, or into per-request errors."""

    def __init__(self) -> None:
        self._current: _Request | None = None
        self._next_chunk = 0
        self._skipping: str | None = None

    def starting(self) -> bool:
        """Whether the next message begins a new request (none is being reassembled)."""
        return self._current is None

    def add(self, message: inference_pb2.PredictRequest, *, limit: int = MAX_STREAM_REQUEST_BYTES) -> _Request | None:
        """The request ``message`` completes, ``None`` while more chunks are due; raises per-request errors.

        ``limit``: tensor bytes the request may carry in all (what the stream's budget has left).
        """
        if self._skipping is not None:
            # The rest of a request that already failed: dropped until its last chunk.
            if message.request_id == self._skipping and message.chunk_index != 0:
                if not message.more_chunks:
                    self._skipping = None
                return None
            self._skipping = None
        try:
            return self._add(message, limit)
        except InferenceError:
            self._current = None
            if message.more_chunks:
                self._skipping = message.request_id
            raise

    def _add(self, message: inference_pb2.PredictRequest, limit: int) -> _Request | None:
        if self._current is None:
            if message.chunk_index != 0:
                raise InvalidTensors(f"request {message.request_id!r} starts at chunk {message.chunk_index}, not 0")
            _check_header(message)
            self._current = _Request(
                message.request_id, message.model_name, message.model_version, list(message.output_names)
            )
            self._next_chunk = 0
        elif message.request_id != self._current.request_id or message.chunk_index != self._next_chunk:
            raise InvalidTensors(
                f"chunk {message.chunk_index} of request {message.request_id!r} arrived while chunk "
                f"{self._next_chunk} of {self._current.request_id!r} was due"
            )
        if sum(len(t.data) for t in message.inputs) > CHUNK_DATA_BYTES:
            raise InvalidTensors(f"a chunk carries over {CHUNK_DATA_BYTES} bytes of tensor data")
        _add_pieces(self._current, message, limit=min(limit, MAX_STREAM_REQUEST_BYTES))
        self._next_chunk += 1
        if message.more_chunks:
            return None
        done, self._current = self._current, None
        return done

    def pending(self) -> str | None:
        """The request_id of a request whose last chunk never came."""
        return self._current.request_id if self._current is not None else None


class _Budget:
    """Tensor bytes of one stream's requests that are queued or running (reassembly aside)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._released = asyncio.Event()

    def take(self, size: int) -> None:
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        self._released.set()

    async def wait_for_room(self) -> None:
        """Until less than the whole budget is in use (the reader pauses: backpressure)."""
        while self.used >= self.limit:
            self._released.clear()
            await self._released.wait()


# --- the servicer ------------------------------------------------------------------------------


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """``edgefleet.v1.Inference`` for the models of ``namespace`` in ``runtime``."""

    def __init__(self, runtime: ModelRuntime, namespace: str) -> None:
        self._runtime = runtime
        self._namespace = namespace

    def _rejected(self) -> None:
        """A request refused before it reached the runtime (which counts the rest): it names no model yet."""
        self._runtime.metrics.inference_error(UNKNOWN_MODEL, "invalid_request")

    async def _predict(self, request: _Request) -> Prediction:
        inputs = request.inputs()
        return await asyncio.to_thread(
            self._runtime.predict,
            request.model_name,
            inputs,
            request.output_names,
            request.model_version,
            namespace=self._namespace,
        )

    async def Predict(self, request: inference_pb2.PredictRequest, context: Context) -> inference_pb2.PredictResponse:
        try:
            try:
                if request.more_chunks or request.chunk_index != 0:
                    raise InvalidTensors("Predict takes whole tensors; chunked requests go through PredictStream")
                _check_header(request)
                logical = _Request(
                    request.request_id, request.model_name, request.model_version, list(request.output_names)
                )
                _add_pieces(logical, request, limit=UNARY_DATA_BYTES)
            except InferenceError:
                self._rejected()
                raise
            prediction = await self._predict(logical)
            outputs = [tensor_message(name, array) for name, array in prediction.outputs]
            if sum(len(t.data) for t in outputs) > UNARY_DATA_BYTES:
                raise _TooLarge("the outputs are over the unary 4 MiB cap; use PredictStream")
        except InferenceError as exc:
            await context.abort(status_code(exc), str(exc)[:MAX_ERROR_MESSAGE])
        except Exception:
            log.exception("Predict of %r failed unexpectedly", request.model_name[:64])
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        return inference_pb2.PredictResponse(
            request_id=request.request_id,
            model_version=prediction.version,
            outputs=outputs,
            timings=_timings(prediction),
        )

    async def _serve(self, request: _Request, budget: _Budget) -> list[inference_pb2.PredictResponse]:
        try:
            return list(response_chunks(request.request_id, await self._predict(request)))
        except InferenceError as exc:
            return [error_response(request.request_id, exc)]
        except Exception:
            log.exception("PredictStream request %r failed unexpectedly", request.request_id)
            return [_internal_response(request.request_id)]
        finally:
            budget.give(request.size)

    async def PredictStream(
        self, request_iterator: AsyncIterator[inference_pb2.PredictRequest], context: Context
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        # Each queued item is a task that resolves to one request's responses; the queue's bound is
        # the pipeline depth, so a full pipeline stops the reader and gRPC stops reading the socket.
        queue: asyncio.Queue[asyncio.Future[list[inference_pb2.PredictResponse]] | None] = asyncio.Queue(PIPELINE_DEPTH)
        reader = asyncio.create_task(self._read(request_iterator, queue))
        try:
            while (item := await queue.get()) is not None:
                for response in await item:
                    yield response
            await reader  # re-raises a failure of the reader (e.g. the client went away)
        finally:
            reader.cancel()
            while not queue.empty():
                leftover = queue.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _read(
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictRequest],
        queue: asyncio.Queue[asyncio.Future[list[inference_pb2.PredictResponse]] | None],
    ) -> None:
        assembler = _Assembler()
        budget = _Budget(MAX_STREAM_IN_FLIGHT_BYTES)
        loop = asyncio.get_running_loop()
        try:
            async for message in request_iterator:
                if assembler.starting():
                    await budget.wait_for_room()
                try:
                    request = assembler.add(message, limit=budget.limit - budget.used)
                except InferenceError as exc:
                    self._rejected()
                    failed: asyncio.Future[list[inference_pb2.PredictResponse]] = loop.create_future()
                    failed.set_result([error_response(message.request_id, exc)])
                    await queue.put(failed)
                    continue
                if request is not None:
                    budget.take(request.size)
                    await queue.put(asyncio.ensure_future(self._serve(request, budget)))
            pending = assembler.pending()
            if pending is not None:
                self._rejected()
                cut: asyncio.Future[list[inference_pb2.PredictResponse]] = loop.create_future()
                cut.set_result([error_response(pending, InvalidTensors("the stream ended inside a chunked request"))])
                await queue.put(cut)
        finally:
            await queue.put(None)

    async def GetModelStatus(
        self, request: inference_pb2.GetModelStatusRequest, context: Context
    ) -> inference_pb2.GetModelStatusResponse:
        views = self._runtime.status(self._namespace, request.model_name)
        if request.model_name and not views:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name!r} on this device")
        return inference_pb2.GetModelStatusResponse(
            models=[
                inference_pb2.ModelStatus(
                    model_name=view.name,
                    state=_MODEL_STATES[view.state],
                    active_version=view.active_version,
                    active_slot=_SLOTS[view.active_slot] if view.active_slot else fleet_pb2.SLOT_UNSPECIFIED,
                    previous_version=view.previous_version,
                    inputs=[tensor_spec(i) for i in view.inputs],
                    outputs=[tensor_spec(o) for o in view.outputs],
                    partition_plan_id=view.partition_plan_id,
                    execution_providers=list(view.execution_providers),
                )
                for view in views
            ]
        )


def _internal_response(request_id: str) -> inference_pb2.PredictResponse:
    return inference_pb2.PredictResponse(
        request_id=request_id,
        error=inference_pb2.RequestError(code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_MESSAGE),
    )


def is_local_address(listen: str) -> bool:
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_inference_server(runtime: ModelRuntime, namespace: str, listen: str) -> tuple[aio.Server, int]:
    """Serve the Inference API on ``listen`` (``HOST:PORT``, port 0 picks one, or ``unix:PATH``); started.

    Returns the server and the bound port (0 for a Unix socket). Insecure on purpose: it is the
    device-local API; a non-loopback address is allowed but logged, since anyone who reaches it
    can run the models.
    """
    server = aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(runtime, namespace), server)
    return server, await start_device_local(server, listen, "the inference API")


async def start_device_local(server: aio.Server, listen: str, what: str) -> int:
    """Bind ``server`` without TLS to ``listen`` and start it; the bound port (0 for a Unix socket).

    The device-local APIs are insecure on purpose; a non-loopback address is allowed but logged,
    since anyone who reaches it can use what it serves.
    """
    if not is_local_address(listen):
        log.warning("%s listens on %s without TLS: it is meant for loopback or a Unix socket", what, listen)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    await server.start()
    return 0 if listen.startswith("unix") else port
