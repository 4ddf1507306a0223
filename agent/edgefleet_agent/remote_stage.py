"""A partition stage served by ``edgefleet accel-server``: the pipeline's ``Stage``, over gRPC.

:class:`RemoteStage` loads its model once (LoadStage; the model file is placed content-addressed
in the folder the server reads, so model bytes never travel over gRPC), then keeps one RunStage
stream open for its lifetime. The pipeline calls :meth:`RemoteStage.run` synchronously; the gRPC
work happens on a private event loop in a background thread. Several threads may call ``run`` (or
:meth:`RemoteStage.submit`) at once: sequences are pipelined up to the window the server granted
and answered in order. A server that goes away, stops answering, or ends the stream surfaces as
:class:`AcceleratorUnavailable`, so the runtime can fall back to running the stage locally.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio

from edgefleet_agent.accel_server import TensorAssembler, tensor_chunks
from edgefleet_agent.errors import AgentError, InferenceError, InferenceFailed, InvalidTensors
from edgefleet_core.atomic import write_file_atomic
from edgefleet_core.optimize.runtime import CPU_EP
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
T = TypeVar("T")

UNLOAD_TIMEOUT: Final = 2.0
"""Seconds :meth:`RemoteStage.close` waits for UnloadStage: the server may already be gone."""


class RemoteStageError(AgentError):
    """The accelerator server cannot serve a remote stage."""


class AcceleratorUnavailable(RemoteStageError):
    """The server is unreachable, stopped answering, or ended the stream: run the stage locally instead."""

    def __init__(self, target: str, problem: str) -> None:
        self.target = target
        """The server's address."""
        self.problem = problem
        super().__init__(f"accelerator server {target}: {problem}")


class StageRejected(RemoteStageError):
    """The server refused to load the stage (missing or tampered model, no provider, conflict)."""

    def __init__(self, target: str, code: grpc.StatusCode, detail: str) -> None:
        self.target = target
        self.code = code
        """The LoadStage status code (NOT_FOUND, DATA_LOSS, FAILED_PRECONDITION, ALREADY_EXISTS, …)."""
        self.detail = detail
        super().__init__(f"accelerator server {target} refused the stage: {code.name}: {detail}")


def _sequence_error(error: inference_pb2.RequestError) -> InferenceError:
    """The agent's own error for a failed sequence, as a local run would have raised it."""
    if error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
        return InvalidTensors(error.message)
    return InferenceFailed(f"remote stage failed ({error.code}): {error.message}")


def place_model(models_dir: Path, model: bytes) -> str:
    """Store ``model`` as ``models_dir/<sha256>.onnx`` (atomically, once); its sha256 hex."""
    digest = hashlib.sha256(model).hexdigest()
    path = models_dir / f"{digest}.onnx"
    if not path.exists():
        write_file_atomic(path, model)
    return digest


def unload_stage(target: str, stage_id: str, timeout: float = UNLOAD_TIMEOUT) -> bool:
    """Ask the server at ``target`` to drop ``stage_id`` (unknown ids are no error); ``False`` if it did not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            inference_pb2_grpc.AcceleratorStageStub(channel).UnloadStage(
                inference_pb2.UnloadStageRequest(stage_id=stage_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            log.info("unloading stage %s from %s failed: %s", stage_id, target, exc)
            return False
    return True


class RemoteStage:
    """A stage model run by the accelerator server at ``target`` (the pipeline's ``Stage`` protocol).

    ``model`` is the ONNX model's bytes (then ``models_dir`` is the server's content-addressed
    folder, where it is placed) or the sha256 hex of a model the server already holds.
    ``stage_id`` defaults to a fresh id per instance, so two clients of one model never unload
    each other's stage. Raises :class:`AcceleratorUnavailable` or :class:`StageRejected`.
    """

    def __init__(
        self,
        target: str,
        model: bytes | str,
        *,
        models_dir: Path | None = None,
        providers: Sequence[str] = (CPU_EP,),
        timeout: float = 30.0,
        max_in_flight: int = 2,
        stage_id: str | None = None,
    ) -> None:
        if isinstance(model, bytes):
            if models_dir is None:
                raise ValueError("models_dir is needed to place model bytes for the server")
            digest = place_model(models_dir, model)
        else:
            digest = model
        self.target = target
        self.model_sha256 = digest
        self.stage_id = stage_id or hashlib.sha256(digest.encode() + os.urandom(16)).hexdigest()
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"remote-stage-{target}", daemon=True)
        self._thread.start()
        self._closed = False
        self._broken: AcceleratorUnavailable | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Array]]] = {}
        self._next_sequence = 0
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        try:
            loaded = self._wait(self._open(list(providers), max_in_flight))
        except BaseException:
            self._stop_loop()
            raise
        self.execution_provider: str = loaded.execution_provider
        """The execution provider the server's session runs on."""
        self.inputs = tuple(spec.name for spec in loaded.inputs)
        self.outputs = tuple(spec.name for spec in loaded.outputs)
        self.max_in_flight = loaded.max_in_flight

    # --- the background loop ----------------------------------------------------------------------

    def _wait(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout if timeout is not None else self.timeout)
        except TimeoutError:
            future.cancel()
            raise AcceleratorUnavailable(self.target, f"no answer within {self.timeout} s") from None

    def _unavailable(self, exc: grpc.RpcError | aio.AioRpcError) -> AcceleratorUnavailable:
        if isinstance(exc, aio.AioRpcError):
            return AcceleratorUnavailable(self.target, f"{exc.code().name}: {exc.details()}")
        return AcceleratorUnavailable(self.target, str(exc))

    async def _open(self, providers: list[str], max_in_flight: int) -> inference_pb2.LoadStageResponse:
        self._channel = aio.insecure_channel(self.target)
        stub = inference_pb2_grpc.AcceleratorStageStub(self._channel)
        request = inference_pb2.LoadStageRequest(
            stage_id=self.stage_id,
            model_sha256=self.model_sha256,
            execution_providers=providers,
            max_in_flight=max_in_flight,
        )
        try:
            loaded: inference_pb2.LoadStageResponse = await stub.LoadStage(request, timeout=self.timeout)
        except aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(exc) from None
            raise StageRejected(self.target, exc.code(), exc.details() or "") from None
        self._window = asyncio.Semaphore(max(1, loaded.max_in_flight))
        self._send_lock = asyncio.Lock()
        self._call = stub.RunStage()
        self._reader = asyncio.create_task(self._read())
        return loaded

    async def _read(self) -> None:
        assembler = TensorAssembler()
        try:
            while True:
                response = await self._call.read()
                if response is aio.EOF:
                    raise AcceleratorUnavailable(self.target, "the server ended the stage's stream")
                future = self._pending.get(response.sequence)
                if future is None:
                    raise AcceleratorUnavailable(self.target, f"answer for unknown sequence {response.sequence}")
                if response.HasField("error"):
                    del self._pending[response.sequence]
                    assembler = TensorAssembler()
                    if not future.done():
                        future.set_exception(_sequence_error(response.error))
                    self._window.release()
                    continue
                assembler.add(response.outputs)
                if response.more_chunks:
                    continue
                del self._pending[response.sequence]
                outputs, assembler = assembler.finish(), TensorAssembler()
                if not future.done():
                    future.set_result(outputs)
                self._window.release()
        except aio.AioRpcError as exc:
            self._fail(self._unavailable(exc))
        except AcceleratorUnavailable as exc:
            self._fail(exc)
        except InvalidTensors as exc:
            self._fail(AcceleratorUnavailable(self.target, f"malformed answer: {exc}"))

    def _fail(self, error: AcceleratorUnavailable) -> None:
        self._broken = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    def _broken_by(self) -> AcceleratorUnavailable | None:
        return self._broken

    @property
    def broken(self) -> AcceleratorUnavailable | None:
        """Why the stream to the server ended (the server went away, stopped answering), else ``None``."""
        return self._broken

    async def _run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        if self._broken is not None:
            raise self._broken
        groups = list(tensor_chunks(inputs.items()))  # InvalidTensors for a dtype the wire cannot carry
        await self._window.acquire()
        async with self._send_lock:
            broken = self._broken_by()  # the stream may have failed while this sequence waited
            if broken is not None:
                self._window.release()
                raise broken
            sequence = self._next_sequence
            self._next_sequence += 1
            future: asyncio.Future[dict[str, Array]] = asyncio.get_running_loop().create_future()
            self._pending[sequence] = future
            try:
                for index, group in enumerate(groups):
                    await self._call.write(
                        inference_pb2.StageRequest(
                            stage_id=self.stage_id,
                            sequence=sequence,
                            inputs=group,
                            chunk_index=index,
                            more_chunks=index < len(groups) - 1,
                        )
                    )
            except (aio.AioRpcError, asyncio.InvalidStateError) as exc:
                error = (
                    self._unavailable(exc)
                    if isinstance(exc, aio.AioRpcError)
                    else AcceleratorUnavailable(self.target, "the stage's stream is closed")
                )
                self._fail(error)
                raise error from None
        return await future

    # --- the Stage protocol ----------------------------------------------------------------------

    def submit(self, inputs: Mapping[str, np.ndarray]) -> concurrent.futures.Future[dict[str, Array]]:
        """Send one sequence now; its outputs later (submissions are answered in order)."""
        if self._closed:
            raise AcceleratorUnavailable(self.target, "the remote stage is closed")
        # Like a local stage, take the stage's own inputs from a mapping that may hold more (the
        # head's other outputs); a missing one is the server's INVALID_ARGUMENT.
        feed = {name: inputs[name] for name in self.inputs if name in inputs}
        try:
            return asyncio.run_coroutine_threadsafe(self._run(feed), self._loop)
        except RuntimeError:  # the loop closed under us: another thread closed the stage just now
            raise AcceleratorUnavailable(self.target, "the remote stage is closed") from None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's outputs by name; :class:`AcceleratorUnavailable` when the server is gone."""
        future = self.submit(inputs)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            error = AcceleratorUnavailable(self.target, f"no answer within {self.timeout} s")
            self._broken = error
            raise error from None

    def close(self, *, unload: bool = True) -> None:
        """Unload the stage (best effort: the server may be gone) and close the channel. Idempotent.

        ``unload=False`` leaves the stage loaded on the server: for a client that will attach to the
        same ``stage_id`` again, which a late UnloadStage would otherwise take away from it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._wait(self._shutdown(unload), timeout=UNLOAD_TIMEOUT + 1.0)
        except AcceleratorUnavailable as exc:
            log.info("closing remote stage %s: %s", self.stage_id, exc)
        finally:
            self._stop_loop()

    async def _shutdown(self, unload: bool) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        if self._channel is None:
            return
        stub = inference_pb2_grpc.AcceleratorStageStub(self._channel)
        try:
            if unload:
                request = inference_pb2.UnloadStageRequest(stage_id=self.stage_id)
                await stub.UnloadStage(request, timeout=UNLOAD_TIMEOUT)
        except aio.AioRpcError as exc:
            log.info("unloading stage %s from %s failed: %s", self.stage_id, self.target, exc.code().name)
        self._fail(AcceleratorUnavailable(self.target, "the remote stage is closed"))
        await self._channel.close()

    def _stop_loop(self) -> None:
        if self._channel is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(AcceleratorUnavailable):
                self._wait(self._channel.close(), timeout=UNLOAD_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
