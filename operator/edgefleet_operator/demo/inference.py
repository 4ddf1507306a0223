"""Inference traffic for one device: the digits test set through the agent's local ``Inference`` API.

Requests go over ``PredictStream`` with a few in flight, so an agent serving a partitioned model
pipelines them through its head and tail stages, as an application on the device would. Each
response is scored against the test label; latency is measured from send to response on this
side (what an application sees). An agent that serves nothing yet answers "not found" or
"unavailable": that is waiting, not an error; any other error counts against the version served.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt

from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc

WINDOW: Final = 4
"""Requests in flight on one stream: enough for the head of one to overlap the tail of another."""
PACE_S: Final = 0.01
"""Pause between sends, so the traffic of six devices leaves CPU to the control plane's builds."""
_NOT_SERVING: Final = frozenset(
    {
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
    }
)


@dataclass
class VersionStats:
    """What one device answered while it served one version."""

    requests: int = 0
    errors: int = 0
    correct: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Sum over the successful answers of the agent's own timing per stage (head, transfer, tail, run, ...)."""


@dataclass(frozen=True)
class Sample:
    """One test image and its label."""

    image: npt.NDArray[np.float32]
    label: int


class InferenceDriver:
    """Sends the test set round and round to one agent until stopped; thread-safe reads of the figures."""

    def __init__(
        self,
        device: str,
        address: str,
        samples: tuple[Sample, ...],
        *,
        model_name: str,
        input_name: str = "input",
        window: int = WINDOW,
        pace_s: float = PACE_S,
    ) -> None:
        if not samples:
            raise ValueError("no samples to send")
        self.device = device
        self._address = address
        self._samples = samples
        self._model_name = model_name
        self._input_name = input_name
        self._window = window
        self._pace_s = pace_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._by_version: dict[str, VersionStats] = {}
        self._last_version: str | None = None
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name=f"demo-inference-{device}", daemon=True)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ figures

    @property
    def last_version(self) -> str | None:
        """The version the last successful answer came from (``None``: nothing served yet)."""
        with self._lock:
            return self._last_version

    @property
    def last_error(self) -> str:
        with self._lock:
            return self._last_error

    def stats(self) -> dict[str, VersionStats]:
        """A copy of the figures per version served."""
        with self._lock:
            return {
                v: VersionStats(s.requests, s.errors, s.correct, list(s.latencies_ms), dict(s.stage_ms))
                for v, s in self._by_version.items()
            }

    def successes_on(self, version: str) -> int:
        with self._lock:
            found = self._by_version.get(version)
            return 0 if found is None else found.requests - found.errors

    # ------------------------------------------------------------------ the traffic

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with grpc.insecure_channel(self._address) as channel:
                    self._stream(inference_pb2_grpc.InferenceStub(channel))
            except grpc.RpcError as exc:
                # The agent restarting its server or going away: reconnect, unless the demo is stopping.
                with self._lock:
                    self._last_error = str(exc)
            self._stop.wait(0.2)

    def _stream(self, stub: inference_pb2_grpc.InferenceStub) -> None:
        slots = threading.Semaphore(self._window)
        sent: dict[str, tuple[float, int]] = {}
        order = itertools.cycle(range(len(self._samples)))

        def requests() -> Iterator[inference_pb2.PredictRequest]:
            for number in itertools.count():
                while not slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                index = next(order)
                request_id = str(number)
                sent[request_id] = (time.perf_counter(), index)
                yield self._request(request_id, self._samples[index])
                if self._pace_s:
                    self._stop.wait(self._pace_s)

        responses = stub.PredictStream(requests())
        try:
            for response in responses:
                started, index = sent.pop(response.request_id, (time.perf_counter(), 0))
                waiting = self._record(response, (time.perf_counter() - started) * 1000.0, self._samples[index].label)
                if waiting:
                    self._stop.wait(0.1)  # nothing installed yet: ask again soon, not in a tight loop
                slots.release()
                if self._stop.is_set():
                    break
        finally:
            responses.cancel()

    def _request(self, request_id: str, sample: Sample) -> inference_pb2.PredictRequest:
        image = sample.image
        tensor = inference_pb2.Tensor(
            name=self._input_name,
            dtype=inference_pb2.DATA_TYPE_FLOAT,
            shape=list(image.shape),
            data=image.astype("<f4").tobytes(),
        )
        return inference_pb2.PredictRequest(request_id=request_id, model_name=self._model_name, inputs=[tensor])

    def _record(self, response: inference_pb2.PredictResponse, latency_ms: float, label: int) -> bool:
        """Count one answer; True when the agent serves nothing yet."""
        error = response.error.code if response.HasField("error") else 0
        with self._lock:
            if error in _NOT_SERVING and not response.model_version:
                self._last_error = response.error.message
                return True
            version = response.model_version or self._last_version or "?"
            stats = self._by_version.setdefault(version, VersionStats())
            stats.requests += 1
            if error:
                stats.errors += 1
                self._last_error = response.error.message
                return error in _NOT_SERVING
            self._last_version = version
            stats.latencies_ms.append(latency_ms)
            for timing in response.timings:
                seconds = timing.duration.seconds + timing.duration.nanos / 1e9
                stats.stage_ms[timing.stage] = stats.stage_ms.get(timing.stage, 0.0) + seconds * 1000.0
            if response.outputs:
                logits = np.frombuffer(response.outputs[0].data, "<f4")
                stats.correct += int(logits.size > 0 and int(np.argmax(logits)) == label)
            return False


def load_samples(path: str, *, input_name: str = "input") -> tuple[Sample, ...]:
    """The test images and labels of an evaluation ``.npz`` (arrays named after the input, and ``labels``)."""
    with np.load(path) as data:
        images = np.asarray(data[input_name], dtype=np.float32)
        labels = np.asarray(data["labels"])
    return tuple(Sample(images[i : i + 1], int(labels[i])) for i in range(len(labels)))
