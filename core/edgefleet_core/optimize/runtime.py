"""ONNX Runtime sessions for evaluation, calibration and sensitivity analysis."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from edgefleet_core.errors import ModelError
from edgefleet_core.optimize.model_io import serialize

CPU_EP = "CPUExecutionProvider"
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_state.Fail,
    ort_state.InvalidGraph,
    ort_state.InvalidArgument,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
)
"""What ONNX Runtime raises for models it cannot load or run (they derive from Exception only)."""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build can use on this machine."""
    return list(ort.get_available_providers())


def can_run(execution_provider: str) -> bool:
    """Whether ``execution_provider`` runs here (so its latency can be measured, not guessed)."""
    return execution_provider in available_providers()


def session(
    model: onnx.ModelProto,
    execution_provider: str = CPU_EP,
    *,
    intra_op_threads: int = 1,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An inference session on ``execution_provider`` with the CPU as fallback.

    One intra-op thread by default: measurements must be comparable between candidates on a
    small, possibly busy machine, and edge devices serve one request per core.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = optimization
    options.log_severity_level = 3
    providers = [execution_provider] if execution_provider == CPU_EP else [execution_provider, CPU_EP]
    try:
        return ort.InferenceSession(serialize(model), sess_options=options, providers=providers)
    except ORT_ERRORS as exc:
        raise ModelError(model.graph.name or "<model>", f"ONNX Runtime cannot load it: {_first_line(exc)}") from None


def run(sess: ort.InferenceSession, outputs: list[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``sess.run`` with ONNX Runtime's failures (bad shapes, kernel errors) as :class:`ModelError`."""
    try:
        return [np.asarray(o) for o in sess.run(outputs, dict(feed))]
    except ORT_ERRORS as exc:
        raise ModelError("<model>", f"ONNX Runtime cannot run it on this data: {_first_line(exc)}") from None
