"""Running a partitioned model: a head stage and a tail stage, one after the other or pipelined.

A :class:`Stage` runs one part of a model: :class:`LocalStage` is an ONNX Runtime session in this
process; a remote accelerator process implements the same protocol. :class:`PipelinedExecutor`
gives each stage a worker thread joined by a bounded queue, so the head of request i+1 runs while
the tail of request i does (ONNX Runtime releases the GIL while it runs, and each session has its
own intra-op thread, so on two cores both stages really run at once). Results come back in
submission order: each stage is one thread taking requests first in, first out.
:class:`SequentialExecutor` runs head then tail in the caller's thread, for comparison.

The queues are ours on purpose: ``queue.Queue`` cannot be closed, and closing must both wake
every waiting submitter and let the workers drain what was already accepted.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from edgefleet_agent.errors import InferenceError, InferenceFailed, InvalidTensors, ModelLoadError
from edgefleet_core.optimize.runtime import CPU_EP, ORT_ERRORS

__all__ = [
    "DEFAULT_DEPTH",
    "LocalStage",
    "PipelineClosed",
    "PipelineError",
    "PipelineFull",
    "PipelinedExecutor",
    "SequentialExecutor",
    "Stage",
    "StagedOutputs",
]

DEFAULT_DEPTH: Final = 2
"""Requests waiting in front of each stage: enough to keep both stages busy, few enough to bound memory."""

Tensors = dict[str, np.ndarray]
_Item = TypeVar("_Item")


class PipelineError(InferenceError):
    """A request cannot enter the pipeline."""


class PipelineFull(PipelineError):
    """A non-blocking submit found ``depth`` requests already waiting (backpressure)."""


class PipelineClosed(PipelineError):
    """The executor was closed; it takes no more requests."""


class Stage(Protocol):
    """One part of a partitioned model, wherever it runs."""

    @property
    def execution_provider(self) -> str:
        """The provider the stage runs on now."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _refuse_external_data(source: bytes | str, label: str) -> None:
    """Refuse a model whose tensors point at external data files.

    A bundle never carries external data (the publisher refuses such models), so one that does
    was not made by us; and ONNX Runtime resolves external-data paths against the working folder
    for a model given as bytes, which would let a model read files that are not part of it.
    """
    try:
        parsed = (
            onnx.load_model_from_string(source)
            if isinstance(source, bytes)
            else onnx.load_model(source, load_external_data=False)
        )
    except (OSError, ValueError, DecodeError, RuntimeError):
        return  # not a model onnx can parse: ONNX Runtime refuses it next, with its own words
    for tensor in external_data_helper._get_all_tensors(parsed):
        if external_data_helper.uses_external_data(tensor):
            raise ModelLoadError(f"{label}: tensor {tensor.name!r} uses external data, which models here never do")


class LocalStage:
    """An ONNX Runtime session in this process, with its own intra-op thread pool.

    ``providers`` in order of preference; the CPU is always added last as the fallback, and
    :attr:`execution_provider` says which one the session actually got. :meth:`run` takes any
    mapping that holds (at least) the model's inputs and ignores the rest, so a caller can pass
    the head's outputs and the forwarded graph inputs together.
    """

    def __init__(
        self,
        model: bytes | str | os.PathLike[str],
        providers: Sequence[str],
        intra_op_threads: int = 1,
        *,
        label: str = "stage",
        optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ) -> None:
        self.label = label
        """Names the stage in errors (e.g. ``model digits 1.0.0, tail``)."""
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available and p != CPU_EP] + [CPU_EP]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = optimization
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else os.fspath(model)
        _refuse_external_data(source, label)
        try:
            self._session: Any = ort.InferenceSession(source, sess_options=options, providers=chosen)
        except ORT_ERRORS as exc:
            raise ModelLoadError(f"{label}: ONNX Runtime cannot load it: {exc}") from None
        self.execution_provider: str = str(self._session.get_providers()[0])
        self.inputs: tuple[Any, ...] = tuple(self._session.get_inputs())
        """ONNX Runtime's NodeArg of every graph input (name, type, shape)."""
        self.outputs: tuple[Any, ...] = tuple(self._session.get_outputs())
        self.input_names = tuple(str(i.name) for i in self.inputs)
        self.output_names = tuple(str(o.name) for o in self.outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's outputs by name; :class:`InvalidTensors` when an input is missing."""
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidTensors(f"{self.label}: no value for inputs {missing}")
        feed = {name: inputs[name] for name in self.input_names}
        try:
            results = self._session.run(list(self.output_names), feed)
        except ORT_ERRORS as exc:
            raise InferenceFailed(f"{self.label}: {exc}") from None
        return {name: np.asarray(value) for name, value in zip(self.output_names, results, strict=True)}

    def close(self) -> None:
        """Nothing to release explicitly: the session goes with the last reference to it."""


@dataclass(frozen=True)
class StagedOutputs:
    """A request's result: the model's outputs in model order, and (stage, seconds) per stage run."""

    outputs: dict[str, np.ndarray]
    timings: tuple[tuple[str, float], ...]


class _Plumbing:
    """How head and tail results combine; shared by both executors."""

    def __init__(self, forwarded: Sequence[str], outputs: Sequence[str], tail_inputs: Sequence[str] | None) -> None:
        if not outputs:
            raise ValueError("a partitioned model needs at least one output")
        self.forwarded = tuple(forwarded)
        self.outputs = tuple(outputs)
        self.tail_inputs = None if tail_inputs is None else tuple(tail_inputs)

    def tail_feed(self, inputs: Mapping[str, np.ndarray], head: Tensors) -> Tensors:
        """What the tail gets: the forwarded graph inputs and the head's outputs (only what it reads, when known)."""
        feed = {name: inputs[name] for name in self.forwarded if name in inputs}
        feed.update(head)
        if self.tail_inputs is None:
            return feed
        return {name: feed[name] for name in self.tail_inputs if name in feed}

    def result(self, head: Tensors, tail: Tensors) -> Tensors:
        """The model's outputs in model order, whichever stage computed them."""
        produced = {**head, **tail}
        missing = [name for name in self.outputs if name not in produced]
        if missing:
            raise InferenceFailed(f"the stages computed no value for outputs {missing}")
        return {name: produced[name] for name in self.outputs}


def _timed(stage: Stage, name: str, inputs: Mapping[str, np.ndarray]) -> tuple[Tensors, tuple[str, float]]:
    started = time.perf_counter()
    outputs = stage.run(inputs)
    return outputs, (name, time.perf_counter() - started)


class _ClosableQueue(Generic[_Item]):
    """A bounded FIFO that can be closed: puts then fail, gets drain what is left and then return None.

    Putters and getters wait on separate conditions and each change wakes one waiter of the other
    kind: on a two-core node every needless wake-up takes a core from a running stage.
    """

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._items: deque[_Item] = deque()
        self._closed = False
        lock = threading.Lock()
        self._not_full = threading.Condition(lock)
        self._not_empty = threading.Condition(lock)

    def put(self, item: _Item, *, block: bool = True) -> None:
        with self._not_full:
            while not self._closed and len(self._items) >= self._depth:
                if not block:
                    raise PipelineFull(f"{self._depth} requests are already waiting")
                self._not_full.wait()
            if self._closed:
                raise PipelineClosed("the pipeline is closed")
            self._items.append(item)
            self._not_empty.notify()

    def get(self) -> _Item | None:
        with self._not_empty:
            while not self._items and not self._closed:
                self._not_empty.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def close(self) -> None:
        with self._not_full:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()


@dataclass
class _Request:
    future: Future[StagedOutputs]
    inputs: Mapping[str, np.ndarray]
    head: Tensors | None = None
    head_timing: tuple[str, float] = ("head", 0.0)


# The workers are functions of their queues and stages, not methods: holding no reference to the
# executor lets it be garbage-collected while they run, and its finalizer then closes the queue.


def _head_worker(stage: Stage, waiting: _ClosableQueue[_Request], handoff: _ClosableQueue[_Request]) -> None:
    try:
        while (request := waiting.get()) is not None:
            if not request.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                request.head, request.head_timing = _timed(stage, "head", request.inputs)
            except Exception as exc:  # noqa: BLE001 - delivered to this request's caller, as concurrent.futures does
                request.future.set_exception(exc)
                continue
            handoff.put(request)  # blocks while the tail is `depth` requests behind: backpressure
    finally:
        handoff.close()
        stage.close()


def _tail_worker(stage: Stage, plumbing: _Plumbing, handoff: _ClosableQueue[_Request]) -> None:
    try:
        while (request := handoff.get()) is not None:
            head = request.head if request.head is not None else {}
            try:
                tail, tail_timing = _timed(stage, "tail", plumbing.tail_feed(request.inputs, head))
                result = StagedOutputs(plumbing.result(head, tail), (request.head_timing, tail_timing))
            except Exception as exc:  # noqa: BLE001 - delivered to this request's caller, as concurrent.futures does
                request.future.set_exception(exc)
                continue
            request.future.set_result(result)
    finally:
        stage.close()


def _outputs_only(source: Future[StagedOutputs]) -> Future[Tensors]:
    derived: Future[Tensors] = Future()

    def copy(done: Future[StagedOutputs]) -> None:
        if done.cancelled():
            derived.cancel()
        elif (exc := done.exception()) is not None:
            derived.set_exception(exc)
        else:
            derived.set_result(done.result().outputs)

    def cancel_source(done: Future[Tensors]) -> None:
        if done.cancelled():
            source.cancel()

    derived.add_done_callback(cancel_source)
    source.add_done_callback(copy)
    return derived


class PipelinedExecutor:
    """Head and tail on their own worker threads, ``depth`` requests queued in front of each.

    ``forwarded``: graph inputs the tail reads directly (:attr:`CutPoint.forwarded`), passed on with
    the head's outputs. ``outputs``: the whole model's outputs in model order (head-computed ones
    included). ``tail_inputs``: what the tail reads, when known, so nothing else is handed to it
    (a remote tail would send it over the link). The executor owns both stages and closes them.
    """

    def __init__(
        self,
        head: Stage,
        tail: Stage,
        *,
        depth: int = DEFAULT_DEPTH,
        forwarded: Sequence[str] = (),
        outputs: Sequence[str],
        tail_inputs: Sequence[str] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.depth = depth
        self.execution_providers = (head.execution_provider, tail.execution_provider)
        plumbing = _Plumbing(forwarded, outputs, tail_inputs)
        self._waiting: _ClosableQueue[_Request] = _ClosableQueue(depth)
        handoff: _ClosableQueue[_Request] = _ClosableQueue(depth)
        self._threads = (
            threading.Thread(
                target=_head_worker, args=(head, self._waiting, handoff), name="pipeline-head", daemon=True
            ),
            threading.Thread(target=_tail_worker, args=(tail, plumbing, handoff), name="pipeline-tail", daemon=True),
        )
        for thread in self._threads:
            thread.start()
        self._finalizer = weakref.finalize(self, self._waiting.close)

    def submit_timed(self, inputs: Mapping[str, np.ndarray], *, block: bool = True) -> Future[StagedOutputs]:
        """Queue one request; outputs with per-stage timings. Blocks while ``depth`` requests wait.

        With ``block=False`` a full pipeline raises :class:`PipelineFull` instead; a closed one
        raises :class:`PipelineClosed`. Failures of the request itself go to its future only.
        """
        future: Future[StagedOutputs] = Future()
        self._waiting.put(_Request(future, inputs), block=block)
        return future

    def submit(self, inputs: Mapping[str, np.ndarray], *, block: bool = True) -> Future[dict[str, np.ndarray]]:
        """Queue one request; its future holds the model's outputs in model order."""
        return _outputs_only(self.submit_timed(inputs, block=block))

    async def submit_async(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`submit` and wait for the outputs without blocking the event loop.

        While the pipeline is full, the wait for room happens on a worker thread; cancelling the
        awaiting task cancels the request if it has not started.
        """
        try:
            future = self.submit(inputs, block=False)
        except PipelineFull:
            future = await asyncio.to_thread(self.submit, inputs)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Take no more requests, finish every accepted one, stop the workers and close the stages."""
        self._finalizer()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> PipelinedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialExecutor:
    """Head then tail in the caller's thread: the same interface, no overlap (the comparison point)."""

    def __init__(
        self,
        head: Stage,
        tail: Stage,
        *,
        forwarded: Sequence[str] = (),
        outputs: Sequence[str],
        tail_inputs: Sequence[str] | None = None,
    ) -> None:
        self._head = head
        self._tail = tail
        self._plumbing = _Plumbing(forwarded, outputs, tail_inputs)
        self._closed = False
        self.execution_providers = (head.execution_provider, tail.execution_provider)

    def run_timed(self, inputs: Mapping[str, np.ndarray]) -> StagedOutputs:
        """Run one request now; errors are raised."""
        if self._closed:
            raise PipelineClosed("the executor is closed")
        head, head_timing = _timed(self._head, "head", inputs)
        tail, tail_timing = _timed(self._tail, "tail", self._plumbing.tail_feed(inputs, head))
        return StagedOutputs(self._plumbing.result(head, tail), (head_timing, tail_timing))

    def submit_timed(self, inputs: Mapping[str, np.ndarray], *, block: bool = True) -> Future[StagedOutputs]:
        """Run the request now; a done future with its outputs or its error."""
        return _settled(lambda: self.run_timed(inputs))

    def submit(self, inputs: Mapping[str, np.ndarray], *, block: bool = True) -> Future[dict[str, np.ndarray]]:
        """Run the request now; a done future with its outputs or its error."""
        return _settled(lambda: self.run_timed(inputs).outputs)

    async def submit_async(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the request on a worker thread (one at a time per caller, no overlap between stages)."""
        return await asyncio.to_thread(lambda: self.run_timed(inputs).outputs)

    def close(self) -> None:
        """Close both stages."""
        if not self._closed:
            self._closed = True
            self._head.close()
            self._tail.close()

    def __enter__(self) -> SequentialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_Result = TypeVar("_Result")


def _settled(work: Callable[[], _Result]) -> Future[_Result]:
    future: Future[_Result] = Future()
    future.set_running_or_notify_cancel()
    try:
        future.set_result(work())
    except PipelineClosed:
        raise
    except Exception as exc:  # noqa: BLE001 - the same contract as the pipelined executor: errors in the future
        future.set_exception(exc)
    return future
