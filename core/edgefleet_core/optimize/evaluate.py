"""Measuring a candidate model against the FP32 source: task metric, latency, size, memory, energy.

Every figure is measured here or reported as unavailable with the reason; nothing is estimated.
Latency is measured only on an execution provider that runs on this machine: a candidate for a
CUDA class evaluated on a CPU-only machine gets ``latency: unmeasured``, not a guess.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from edgefleet_core.errors import DataError, ModelError
from edgefleet_core.optimize.data import Array, Dataset, input_specs
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.runtime import CPU_EP, can_run, run, session

Metric = Literal["top1", "top1Agreement", "meanAbsoluteError"]
RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class LatencyFigures:
    """Latency of one sample (batch of one), or why it was not measured."""

    p50_ms: float | None
    p95_ms: float | None
    runs: int
    execution_provider: str
    """The provider the figures are for: the class's when it runs here."""
    unmeasured_reason: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """Everything measured about one model."""

    metric: Metric
    score: float
    """The metric as a score where higher is better (accuracy, agreement, or the negated error)."""
    metric_value: float
    """The metric as users read it (accuracy 0..1, agreement 0..1, mean absolute error)."""
    agreement: float | None
    """Top-1 agreement with the FP32 model, for classifiers."""
    cosine_similarity: float
    """Mean cosine similarity of the first output with the FP32 model's, per sample."""
    size_bytes: int
    latency: LatencyFigures
    peak_memory_bytes: int | None
    energy_joules_per_inference: float | None
    energy_unavailable_reason: str | None


def choose_metric(requested: Metric | None, reference: Array, labels: Array | None) -> Metric:
    """The metric to use: the requested one if the data allows it, else the best the data supports."""
    classifier = reference.ndim == 2 and reference.shape[1] > 1
    has_class_labels = labels is not None and np.issubdtype(labels.dtype, np.integer) and labels.ndim == 1
    if requested == "top1" and not (classifier and has_class_labels):
        raise DataError("<data>", "metric top1 needs integer class labels and a model with [N, classes] outputs")
    if requested is not None:
        if requested == "top1Agreement" and not classifier:
            raise DataError("<data>", "metric top1Agreement needs a model with [N, classes] outputs")
        return requested
    if classifier and has_class_labels:
        return "top1"
    if classifier:
        return "top1Agreement"
    return "meanAbsoluteError"


def run_batches(sess: ort.InferenceSession, data: Dataset, batch_size: int = 64) -> Array:
    """The first output over the whole data set, in order."""
    output = sess.get_outputs()[0].name
    parts = [run(sess, [output], feed)[0] for feed in data.batches(batch_size)]
    return np.concatenate(parts, axis=0)


def _rows(values: Array) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)


def _cosine(a: Array, b: Array) -> float:
    x, y = _rows(a), _rows(b)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, np.sum(x * y, axis=1) / np.where(both_zero, 1.0, norms))
    return float(np.mean(cos))


def score_outputs(metric: Metric, outputs: Array, reference: Array, labels: Array | None) -> tuple[float, float]:
    """``(score, metric value)`` of outputs against the labels or the FP32 reference outputs."""
    if metric == "top1":
        assert labels is not None
        accuracy = float(np.mean(np.argmax(outputs, axis=1) == labels))
        return accuracy, accuracy
    if metric == "top1Agreement":
        agreement = float(np.mean(np.argmax(outputs, axis=1) == np.argmax(reference, axis=1)))
        return agreement, agreement
    target = reference if labels is None or labels.shape[0] != outputs.shape[0] else labels
    if labels is not None and target is labels:
        error = float(np.mean(np.abs(_rows(outputs) - _rows(labels.astype(np.float64)))))
    else:
        error = float(np.mean(np.abs(_rows(outputs) - _rows(target))))
    return -error, error


def _vm_kib(field: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    # Linux resets VmHWM (peak RSS) to the current RSS when "5" is written to clear_refs.
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _read_energy_uj() -> int | None:
    try:
        return int(RAPL_ENERGY.read_text().strip())
    except (OSError, ValueError):
        return None


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model insists on (its first input's fixed first dimension), else ``None``."""
    specs = input_specs(model)
    return specs[0].shape[0] if specs and specs[0].shape else None


def _feeds(data: Dataset, batch: int, count: int) -> list[dict[str, Array]]:
    usable = len(data) - len(data) % batch
    return [data.sample(i % usable - (i % usable) % batch, batch) for i in range(0, count * batch, batch)]


def _energy_reason() -> str:
    return f"no RAPL powercap counter readable at {RAPL_ENERGY}"


@dataclass(frozen=True)
class Timing:
    """Latency of one model in an interleaved measurement, with energy when RAPL is readable."""

    latency: LatencyFigures
    energy_joules_per_inference: float | None
    energy_unavailable_reason: str | None


def interleaved_latency(
    models: Mapping[str, onnx.ModelProto],
    data: Dataset,
    execution_provider: str = CPU_EP,
    *,
    rounds: int = 5,
    runs: int = 40,
    warmup: int = 5,
) -> dict[str, Timing]:
    """p50/p95 of inference on ``execution_provider`` for several models, measured in interleaved rounds.

    Round 1 of every model, then round 2 ...: background load on a small shared machine falls on
    every model alike, so the ratios between them hold. One request is one sample, or the batch a
    model with a fixed batch dimension insists on. A provider that does not run here, or that
    ONNX Runtime silently replaces by the CPU, gives ``unmeasured`` with the reason.
    """
    out: dict[str, Timing] = {}
    sessions = {}
    for name, model in models.items():
        if not can_run(execution_provider):
            reason = f"{execution_provider} is not available on this machine"
            out[name] = Timing(LatencyFigures(None, None, 0, execution_provider, reason), None, "latency not measured")
            continue
        sess = session(model, execution_provider)
        if execution_provider not in sess.get_providers():
            reason = f"ONNX Runtime lists {execution_provider} but the session fell back to {sess.get_providers()}"
            out[name] = Timing(LatencyFigures(None, None, 0, execution_provider, reason), None, "latency not measured")
            continue
        feeds = _feeds(data, fixed_batch(model) or 1, runs)
        output = sess.get_outputs()[0].name
        for feed in feeds[:warmup]:
            run(sess, [output], feed)  # surfaces run-time failures before anything is timed
        sessions[name] = (sess, output, feeds)
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    energy: dict[str, float | None] = dict.fromkeys(sessions, 0.0)
    for _ in range(rounds):
        for name, (sess, output, feeds) in sessions.items():
            start_energy = _read_energy_uj()
            for feed in feeds:
                start = time.perf_counter_ns()
                sess.run([output], feed)
                timings[name].append((time.perf_counter_ns() - start) / 1e6)
            end_energy = _read_energy_uj()
            spent = energy[name]
            if spent is None or start_energy is None or end_energy is None or end_energy < start_energy:
                energy[name] = None  # unreadable, or the counter wrapped
            else:
                energy[name] = spent + (end_energy - start_energy) / 1e6
    for name, values in timings.items():
        figures = LatencyFigures(
            p50_ms=float(np.percentile(values, 50)),
            p95_ms=float(np.percentile(values, 95)),
            runs=len(values),
            execution_provider=execution_provider,
        )
        joules = energy[name]
        # Package energy over the timed runs: includes whatever else ran meanwhile; an upper bound.
        per_inference = joules / len(values) if joules is not None else None
        out[name] = Timing(figures, per_inference, None if per_inference is not None else _energy_reason())
    return out


class ModelEvaluator:
    """Evaluates models against one FP32 reference on one data set; also the passes' :class:`Evaluator`."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        data: Dataset,
        execution_provider: str = CPU_EP,
        metric: Metric | None = None,
        *,
        latency_rounds: int = 5,
    ) -> None:
        self.batch = fixed_batch(reference)
        if self.batch is not None:
            # A model with a fixed batch dimension only takes whole batches of that size.
            usable = len(data) - len(data) % self.batch
            if usable == 0:
                raise DataError("<data>", f"the model takes batches of exactly {self.batch}; the data has {len(data)}")
            data = data.take(usable)
        self.data = data
        self.execution_provider = execution_provider
        self.latency_rounds = latency_rounds
        self.reference_outputs = run_batches(session(reference), data, self.batch or 64)
        self.metric: Metric = choose_metric(metric, self.reference_outputs, data.labels)
        self._classifier = self.reference_outputs.ndim == 2 and self.reference_outputs.shape[1] > 1

    def outputs(self, model: onnx.ModelProto) -> Array:
        """The first output of ``model`` over the data (CPU: exact kernels for accuracy)."""
        return run_batches(session(model), self.data, self.batch or 64)

    def score(self, model: onnx.ModelProto) -> float:
        """The metric as a higher-is-better score."""
        return score_outputs(self.metric, self.outputs(model), self.reference_outputs, self.data.labels)[0]

    def latency_ms(self, model: onnx.ModelProto) -> float | None:
        """Median latency of one request on the target EP, ``None`` when it cannot run here."""
        timing = interleaved_latency({"model": model}, self.data, self.execution_provider, rounds=2, runs=20)
        return timing["model"].latency.p50_ms

    def _quality(self, model: onnx.ModelProto, timing: Timing) -> Evaluation:
        baseline_kib = _vm_kib("VmRSS")
        peak_ok = _reset_peak_rss()
        outputs = self.outputs(model)
        peak_kib = _vm_kib("VmHWM")
        peak = (peak_kib - baseline_kib) * 1024 if peak_ok and peak_kib and baseline_kib else None
        score, value = score_outputs(self.metric, outputs, self.reference_outputs, self.data.labels)
        agreement = (
            float(np.mean(np.argmax(outputs, axis=1) == np.argmax(self.reference_outputs, axis=1)))
            if self._classifier
            else None
        )
        return Evaluation(
            metric=self.metric,
            score=score,
            metric_value=value,
            agreement=agreement,
            cosine_similarity=_cosine(outputs, self.reference_outputs),
            size_bytes=len(serialize(model)),
            latency=timing.latency,
            peak_memory_bytes=max(peak, 0) if peak is not None else None,
            energy_joules_per_inference=timing.energy_joules_per_inference,
            energy_unavailable_reason=timing.energy_unavailable_reason,
        )

    def evaluate_all(self, models: Mapping[str, onnx.ModelProto]) -> dict[str, Evaluation | ModelError]:
        """Every figure for each model, latency measured for all of them together (interleaved).

        A model ONNX Runtime cannot load or run gets its :class:`ModelError` instead of figures,
        so one broken candidate does not stop the others from being judged.
        """
        runnable: dict[str, onnx.ModelProto] = {}
        failures: dict[str, ModelError] = {}
        for name, model in models.items():
            try:
                self.outputs(model)
            except ModelError as exc:
                failures[name] = exc
            else:
                runnable[name] = model
        timings = interleaved_latency(runnable, self.data, self.execution_provider, rounds=self.latency_rounds)
        results: dict[str, Evaluation | ModelError] = {}
        for name in models:
            results[name] = failures[name] if name in failures else self._quality(runnable[name], timings[name])
        return results

    def evaluate(self, model: onnx.ModelProto) -> Evaluation:
        """Every figure for one model (raises :class:`ModelError` if ONNX Runtime cannot run it)."""
        result = self.evaluate_all({"model": model})["model"]
        if isinstance(result, ModelError):
            raise result
        return result
