"""``edgefleet.v1.AcceleratorStage`` over grpc.aio: the tail of a partition plan in its own process.

Three parts, edge to middle:

* the wire helpers (:func:`tensor_chunks`, :class:`TensorAssembler`) split tensors into messages of
  at most 1 MiB of data and put them back together; the remote stage client uses them too;
* :class:`StageService` is transport-free: it loads content-addressed stage models into ONNX
  Runtime sessions, runs them and unloads them, raising the agent's typed errors;
* :class:`AcceleratorStageServicer` translates messages, runs each RunStage stream's sequences in
  order, and maps errors to status codes (LoadStage, UnloadStage) or per-sequence ``error`` fields.

Served insecure on purpose, like the local Inference API: it runs next to the agent on the same
device, reached over loopback or a Unix socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from grpc import aio

from edgefleet_agent.errors import AgentError, InferenceError, InvalidTensors, ModelLoadError
from edgefleet_agent.inference_server import (
    CHUNK_DATA_BYTES,
    DATA_TYPES,
    INTERNAL_MESSAGE,
    MAX_ERROR_MESSAGE,
    MAX_STREAM_REQUEST_BYTES,
    MAX_TENSORS,
    start_device_local,
    status_code,
    tensor_spec,
    to_array,
    wire_dtype,
    wire_shape,
)
from edgefleet_agent.pipeline import LocalStage
from edgefleet_agent.runtime import TensorInfo, tensor_infos
from edgefleet_core.optimize.runtime import CPU_EP
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
Array = npt.NDArray[Any]

MAX_IN_FLIGHT: Final = 8
"""Most sequences one RunStage stream may have outstanding (granted when the client asks for 0 or more)."""
MAX_STAGE_ID: Final = 128
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- errors of the accelerator stage (all AgentError, mapped to status codes by the servicer) ----


class AcceleratorStageError(AgentError):
    """A stage cannot be loaded or run by the accelerator server."""


class StageNotFound(AcceleratorStageError):
    """No such loaded stage, or no model file for the digest (NOT_FOUND)."""


class StageModelCorrupt(AcceleratorStageError):
    """The stored model file does not hash to the digest it is stored under (DATA_LOSS)."""


class NoUsableProvider(AcceleratorStageError):
    """None of the requested execution providers exists in this ONNX Runtime build (FAILED_PRECONDITION)."""


class StageConflict(AcceleratorStageError):
    """The stage id is loaded with another model digest (ALREADY_EXISTS)."""


class BadStageRequest(AcceleratorStageError):
    """A malformed request: ids, digests, sequence numbers (INVALID_ARGUMENT)."""


def stage_status_code(error: AgentError) -> grpc.StatusCode:
    """The status code of an error raised while serving the AcceleratorStage API."""
    codes: dict[type[AgentError], grpc.StatusCode] = {
        StageNotFound: grpc.StatusCode.NOT_FOUND,
        StageModelCorrupt: grpc.StatusCode.DATA_LOSS,
        NoUsableProvider: grpc.StatusCode.FAILED_PRECONDITION,
        StageConflict: grpc.StatusCode.ALREADY_EXISTS,
        BadStageRequest: grpc.StatusCode.INVALID_ARGUMENT,
        # A file that hashes right but ONNX Runtime cannot load: the caller asked for a bad model.
        ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    }
    for kind, code in codes.items():
        if isinstance(error, kind):
            return code
    if isinstance(error, InferenceError):
        return status_code(error)
    return grpc.StatusCode.INTERNAL


# --- wire: chunking and reassembly -------------------------------------------------------------


def tensor_chunks(
    arrays: Iterable[tuple[str, Array]], limit: int = CHUNK_DATA_BYTES
) -> Iterator[list[inference_pb2.Tensor]]:
    """Tensor pieces grouped into messages of at most ``limit`` bytes of data (inference.proto's chunking).

    Always yields at least one (possibly empty) group. The only copy of an array's data is the one
    into each message: pieces are cut from a memoryview over the (little-endian, C-order) array.
    """
    group: list[inference_pb2.Tensor] = []
    room = limit
    for name, array in arrays:
        number = DATA_TYPES.get(array.dtype.name)
        if number is None:
            raise InvalidTensors(f"tensor {name!r} is {array.dtype.name}, which the API cannot carry")
        contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = contiguous.reshape(-1).view(np.uint8).data
        shape = list(contiguous.shape)
        offset = 0
        while True:
            if room == 0:
                yield group
                group, room = [], limit
            take = min(room, len(data) - offset)
            group.append(
                inference_pb2.Tensor(name=name, dtype=number, shape=shape, data=bytes(data[offset : offset + take]))
            )
            offset += take
            room -= take
            if offset >= len(data):
                break
    yield group


@dataclass
class _Pieces:
    number: inference_pb2.DataType.ValueType
    shape: tuple[int, ...]
    expected: int
    parts: list[bytes]
    size: int = 0


class TensorAssembler:
    """Puts one logical message's tensors back together from its chunks' pieces."""

    def __init__(self, limit: int = MAX_STREAM_REQUEST_BYTES) -> None:
        self._limit = limit
        self._size = 0
        self._tensors: dict[str, _Pieces] = {}

    def add(self, pieces: Sequence[inference_pb2.Tensor]) -> None:
        """Take one chunk's pieces; :class:`InvalidTensors` when they cannot belong to whole tensors."""
        if sum(len(p.data) for p in pieces) > CHUNK_DATA_BYTES:
            raise InvalidTensors(f"a chunk carries over {CHUNK_DATA_BYTES} bytes of tensor data")
        for piece in pieces:
            if not piece.name:
                raise InvalidTensors("a tensor has no name")
            held = self._tensors.get(piece.name)
            shape = wire_shape(piece.shape, piece.name)
            if held is None:
                if len(self._tensors) >= MAX_TENSORS:
                    raise InvalidTensors(f"a message carries at most {MAX_TENSORS} tensors")
                expected = int(np.prod(shape, dtype=np.int64)) * wire_dtype(piece.dtype, piece.name).itemsize
                held = self._tensors[piece.name] = _Pieces(piece.dtype, shape, expected, [])
            elif (held.number, held.shape) != (piece.dtype, shape):
                raise InvalidTensors(f"pieces of tensor {piece.name!r} disagree on dtype or shape")
            held.size += len(piece.data)
            self._size += len(piece.data)
            if held.size > held.expected:
                raise InvalidTensors(f"tensor {piece.name!r} has over {held.expected} bytes of data")
            if self._size > self._limit:
                raise InvalidTensors(f"a message carries over {self._limit} bytes of tensor data")
            held.parts.append(piece.data)

    def finish(self) -> dict[str, Array]:
        """The whole tensors by name; a tensor with a single piece is not copied again."""
        return {
            name: to_array(
                name, held.number, held.shape, held.parts[0] if len(held.parts) == 1 else b"".join(held.parts)
            )
            for name, held in self._tensors.items()
        }


def duration_seconds(message: Any) -> float:
    """Seconds of a ``google.protobuf.Duration``."""
    return float(message.ToNanoseconds()) / 1e9


# --- the transport-free service ----------------------------------------------------------------


def check_inputs(what: str, infos: Sequence[TensorInfo], inputs: Mapping[str, Array]) -> None:
    """:class:`InvalidTensors` naming the first input that is unknown, missing, or of the wrong dtype or shape."""
    expected = {info.name: info for info in infos}
    unknown = sorted(set(inputs) - set(expected))
    missing = sorted(set(expected) - set(inputs))
    if unknown or missing:
        raise InvalidTensors(f"{what} takes inputs {sorted(expected)}; unknown {unknown}, missing {missing}")
    for name, value in inputs.items():
        info = expected[name]
        if info.dtype is None or value.dtype.name != info.dtype:
            raise InvalidTensors(f"input {name!r} is {value.dtype.name}; {what} takes {info.dtype or 'another type'}")
        if value.ndim != len(info.shape) or any(
            want is not None and got != want for got, want in zip(value.shape, info.shape, strict=True)
        ):
            wanted = ["?" if d is None else d for d in info.shape]
            raise InvalidTensors(f"input {name!r} has shape {list(value.shape)}; {what} takes {wanted}")


@dataclass(frozen=True)
class LoadedStage:
    """A stage's session: what LoadStage answers, and what RunStage streams run on."""

    stage_id: str
    model_sha256: str
    session: LocalStage
    max_in_flight: int
    load_seconds: float

    @property
    def execution_provider(self) -> str:
        return self.session.execution_provider

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return tensor_infos(self.session.inputs)

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tensor_infos(self.session.outputs)

    def run(self, inputs: Mapping[str, Array]) -> tuple[list[tuple[str, Array]], float]:
        """Outputs in session order and the seconds the session ran; InvalidTensors / InferenceFailed."""
        check_inputs(f"stage {self.stage_id}", self.inputs, inputs)
        started = time.perf_counter()
        outputs = self.session.run(inputs)
        seconds = time.perf_counter() - started
        return [(name, outputs[name]) for name in self.session.output_names], seconds


class StageService:
    """The stages one accelerator server holds, loaded from ``models_dir/<sha256>.onnx``."""

    def __init__(self, models_dir: Path, *, providers: Sequence[str] = (CPU_EP,), intra_op_threads: int = 1) -> None:
        self.models_dir = models_dir
        self.providers = tuple(providers)
        """The order used when a LoadStage request names none."""
        self.intra_op_threads = intra_op_threads
        self._stages: dict[str, LoadedStage] = {}
        self._unloaded: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()

    def _create(self, stage_id: str, digest: str, providers: Sequence[str], max_in_flight: int) -> LoadedStage:
        available = set(ort.get_available_providers())
        provider = next((p for p in providers if p in available), None)
        if provider is None:
            raise NoUsableProvider(
                f"none of the execution providers {list(providers)} exists here; {sorted(available)} do"
            )
        path = self.models_dir / f"{digest}.onnx"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StageNotFound(f"no model {digest} in {self.models_dir}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise StageModelCorrupt(f"{path} hashes to {actual}, not {digest}")
        started = time.perf_counter()
        session = LocalStage(data, [provider], self.intra_op_threads, label=f"stage {stage_id}")
        granted = min(max_in_flight, MAX_IN_FLIGHT) if max_in_flight > 0 else MAX_IN_FLIGHT
        return LoadedStage(stage_id, digest, session, granted, time.perf_counter() - started)

    async def load(
        self, stage_id: str, digest: str, providers: Sequence[str], max_in_flight: int
    ) -> tuple[LoadedStage, bool]:
        """The loaded stage and whether this call created it (False: it was loaded with the same digest)."""
        if not stage_id or len(stage_id) > MAX_STAGE_ID:
            raise BadStageRequest(f"stage_id must be 1 to {MAX_STAGE_ID} characters")
        if not _SHA256.fullmatch(digest):
            raise BadStageRequest(f"model_sha256 {digest[:80]!r} is not 64 lowercase hex digits")
        async with self._lock:
            held = self._stages.get(stage_id)
            if held is not None:
                if held.model_sha256 != digest:
                    raise StageConflict(f"stage {stage_id} is loaded with model {held.model_sha256}, not {digest}")
                return held, False
            stage = await asyncio.to_thread(
                self._create, stage_id, digest, list(providers) or list(self.providers), max_in_flight
            )
            self._stages[stage_id] = stage
            self._unloaded[stage_id] = asyncio.Event()
            log.info("[stage/%s] loaded model %s on %s", stage_id, digest, stage.execution_provider)
            return stage, True

    def get(self, stage_id: str) -> tuple[LoadedStage, asyncio.Event]:
        """A loaded stage and the event set when it is unloaded; :class:`StageNotFound` if not loaded."""
        stage = self._stages.get(stage_id)
        if stage is None:
            raise StageNotFound(f"stage {stage_id[:MAX_STAGE_ID]!r} is not loaded")
        return stage, self._unloaded[stage_id]

    async def unload(self, stage_id: str) -> None:
        """Drop a stage (streams running it finish what they hold, then end); unknown ids are fine."""
        async with self._lock:
            if self._stages.pop(stage_id, None) is not None:
                self._unloaded.pop(stage_id).set()
                log.info("[stage/%s] unloaded", stage_id)


# --- the servicer ------------------------------------------------------------------------------


@dataclass
class _Sequence:
    """One reassembled (or failed) StageRequest, queued for the stream's runner."""

    number: int
    inputs: dict[str, Array] | None
    error: InferenceError | None = None


def _error_response(sequence: int, code: grpc.StatusCode, message: str) -> inference_pb2.StageResponse:
    return inference_pb2.StageResponse(
        sequence=sequence,
        error=inference_pb2.RequestError(code=code.value[0], message=message[:MAX_ERROR_MESSAGE]),
    )


def _response_chunks(
    sequence: int, outputs: list[tuple[str, Array]], seconds: float
) -> Iterator[inference_pb2.StageResponse]:
    groups = list(tensor_chunks(outputs))
    for index, group in enumerate(groups):
        response = inference_pb2.StageResponse(
            sequence=sequence, outputs=group, chunk_index=index, more_chunks=index < len(groups) - 1
        )
        if index == len(groups) - 1:
            response.compute_duration.FromNanoseconds(round(seconds * 1e9))
        yield response


class _SequenceReader:
    """Reassembles consecutive sequences from a RunStage stream's messages."""

    def __init__(self) -> None:
        self.expected = 0
        """The sequence being read (or due next)."""
        self.chunk = 0
        """The chunk due next within it."""
        self._assembler = TensorAssembler()
        self._failed: InferenceError | None = None

    def add(self, message: inference_pb2.StageRequest) -> _Sequence | None:
        """The sequence ``message`` completes (possibly a failed one), ``None`` while chunks are due."""
        if message.sequence != self.expected or message.chunk_index != self.chunk:
            raise _StreamAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"got chunk {message.chunk_index} of sequence {message.sequence}; "
                f"chunk {self.chunk} of sequence {self.expected} was due",
            )
        if self._failed is None:
            try:
                self._assembler.add(message.inputs)
            except InferenceError as exc:
                self._failed = exc  # the rest of this sequence's chunks are read and dropped
        if message.more_chunks:
            self.chunk += 1
            return None
        item = _Sequence(self.expected, None, self._failed)
        if self._failed is None:
            try:
                item.inputs = self._assembler.finish()
            except InferenceError as exc:
                item.error = exc
        self.expected, self.chunk = self.expected + 1, 0
        self._assembler, self._failed = TensorAssembler(), None
        return item


class _StreamAbort(Exception):
    """Ends a RunStage stream with a status (a protocol violation, not a per-sequence failure)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    """One RunStage stream's state: the reader reassembles sequences, the runner answers them in order."""

    def __init__(self, service: StageService) -> None:
        self._service = service
        self.stage: LoadedStage | None = None
        self.unloaded: asyncio.Event | None = None
        self.outstanding = 0
        self.queue: asyncio.Queue[_Sequence | _StreamAbort | None] = asyncio.Queue()
        self.ready = asyncio.Event()

    async def read(self, requests: AsyncIterator[inference_pb2.StageRequest]) -> None:
        sequences = _SequenceReader()
        try:
            async for message in requests:
                if self.stage is None:
                    self.stage, self.unloaded = self._service.get(message.stage_id)
                    self.ready.set()
                if message.stage_id != self.stage.stage_id:
                    raise _StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, "stage_id changed within a RunStage stream")
                item = sequences.add(message)
                if item is not None:
                    self._queue(item)
            if sequences.chunk != 0:
                self._queue(_Sequence(sequences.expected, None, InvalidTensors("the stream ended inside a sequence")))
        except AgentError as exc:  # the first message names an unknown stage
            self.queue.put_nowait(_StreamAbort(stage_status_code(exc), str(exc)))
        except _StreamAbort as exc:
            self.queue.put_nowait(exc)
        finally:
            self.ready.set()
            self.queue.put_nowait(None)

    def _queue(self, item: _Sequence) -> None:
        assert self.stage is not None
        if self.outstanding >= self.stage.max_in_flight:
            raise _StreamAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"over the granted {self.stage.max_in_flight} sequences in flight"
            )
        self.outstanding += 1
        self.queue.put_nowait(item)

    async def next(self) -> _Sequence | _StreamAbort | None:
        """The next queued item, or an ABORTED once the stage is unloaded and nothing is left to answer."""
        if self.unloaded is None or not self.queue.empty():
            return await self.queue.get()
        getter = asyncio.ensure_future(self.queue.get())
        unloaded = asyncio.ensure_future(self.unloaded.wait())
        try:
            await asyncio.wait({getter, unloaded}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unloaded.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return _StreamAbort(grpc.StatusCode.ABORTED, "the stage was unloaded")


class AcceleratorStageServicer(inference_pb2_grpc.AcceleratorStageServicer):
    """``edgefleet.v1.AcceleratorStage`` in front of a :class:`StageService`."""

    def __init__(self, service: StageService) -> None:
        self._service = service

    async def LoadStage(
        self, request: inference_pb2.LoadStageRequest, context: Context
    ) -> inference_pb2.LoadStageResponse:
        try:
            stage, created = await self._service.load(
                request.stage_id, request.model_sha256, list(request.execution_providers), request.max_in_flight
            )
        except AgentError as exc:
            await context.abort(stage_status_code(exc), str(exc)[:MAX_ERROR_MESSAGE])
        response = inference_pb2.LoadStageResponse(
            stage_id=stage.stage_id,
            execution_provider=stage.execution_provider,
            inputs=[tensor_spec(i) for i in stage.inputs],
            outputs=[tensor_spec(o) for o in stage.outputs],
            max_in_flight=stage.max_in_flight,
        )
        response.load_duration.FromNanoseconds(round(stage.load_seconds * 1e9) if created else 0)
        return response

    async def UnloadStage(
        self, request: inference_pb2.UnloadStageRequest, context: Context
    ) -> inference_pb2.UnloadStageResponse:
        await self._service.unload(request.stage_id)
        return inference_pb2.UnloadStageResponse()

    async def _answer(self, stage: LoadedStage, item: _Sequence) -> list[inference_pb2.StageResponse]:
        if item.error is not None or item.inputs is None:
            error = item.error or InvalidTensors("no inputs")
            return [_error_response(item.number, stage_status_code(error), str(error))]
        try:
            outputs, seconds = await asyncio.to_thread(stage.run, item.inputs)
            return list(_response_chunks(item.number, outputs, seconds))
        except InferenceError as exc:
            return [_error_response(item.number, stage_status_code(exc), str(exc))]
        except Exception:
            log.exception("[stage/%s] sequence %d failed unexpectedly", stage.stage_id, item.number)
            return [_error_response(item.number, grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)]

    async def RunStage(
        self, request_iterator: AsyncIterator[inference_pb2.StageRequest], context: Context
    ) -> AsyncIterator[inference_pb2.StageResponse]:
        stream = _Stream(self._service)
        reader = asyncio.create_task(stream.read(request_iterator))
        try:
            while (item := await stream.next()) is not None:
                if isinstance(item, _StreamAbort):
                    await context.abort(item.code, str(item)[:MAX_ERROR_MESSAGE])
                assert stream.stage is not None  # a sequence is only queued once the stage is known
                responses = await self._answer(stream.stage, item)
                for response in responses[:-1]:
                    yield response
                # Counted as answered before the last chunk goes out, so a client that sends the next
                # sequence the moment it receives this one never finds the window still full here.
                stream.outstanding -= 1
                yield responses[-1]
            await reader  # re-raises a failure of the reader (e.g. the client went away)
        finally:
            reader.cancel()


async def start_accel_server(
    models_dir: Path, listen: str, *, providers: Sequence[str] = (CPU_EP,), intra_op_threads: int = 1
) -> tuple[aio.Server, int]:
    """Serve AcceleratorStage on ``listen`` (``HOST:PORT``, port 0 picks one, or ``unix:PATH``); started.

    Returns the server and the bound port (0 for a Unix socket). Insecure on purpose (it runs next
    to the agent); a non-loopback address is allowed but logged.
    """
    server = aio.server()
    service = StageService(models_dir, providers=providers, intra_op_threads=intra_op_threads)
    inference_pb2_grpc.add_AcceleratorStageServicer_to_server(AcceleratorStageServicer(service), server)
    return server, await start_device_local(server, listen, "the accelerator server")
