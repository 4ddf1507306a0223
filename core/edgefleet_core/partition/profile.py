"""Timing model segments on real ONNX Runtime sessions: the measurements the partition planner prices.

Timed runs, not ONNX Runtime's profiler: what the planner needs is the wall time of one whole
``run`` call per segment (kernels plus session overhead), as the executor will pay it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from edgefleet_core.optimize.runtime import CPU_EP, run, session
from edgefleet_core.partition.cuts import PartitionError

__all__ = ["SegmentProfile", "example_inputs", "profile_model", "time_session"]

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class SegmentProfile:
    """How long one segment (head, tail or the whole model) takes per run on one execution provider."""

    execution_provider: str
    """The provider the session ran on (the CPU when the requested one is not available here)."""
    median_ms: float
    p95_ms: float
    runs: int


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def example_inputs(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the model's declared types and shapes (a symbolic first dimension is ``batch``).

    Floats are uniform in [0, 1), integers and booleans are zero (safe as indices). A symbolic
    dimension other than the first cannot be guessed: :class:`PartitionError`, give inputs instead.
    """
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for value in _graph_inputs(model):
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            raise PartitionError(f"input {value.name!r} has no tensor shape; give example inputs")
        shape: list[int] = []
        for position, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif position == 0:
                shape.append(batch)
            else:
                raise PartitionError(f"input {value.name!r} has an unknown dimension {position}; give example inputs")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if np.issubdtype(dtype, np.floating):
            feed[value.name] = rng.uniform(0.0, 1.0, shape).astype(dtype)
        else:
            feed[value.name] = np.zeros(shape, dtype=dtype)
    return feed


def time_session(
    sess: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
) -> tuple[float, float]:
    """Median and p95 wall time of ``sess.run`` in milliseconds, after ``warmup`` untimed runs."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    for _ in range(warmup):
        run(sess, None, feed)
    samples: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        run(sess, None, feed)
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p95 = samples[min(len(samples) - 1, int(np.ceil(0.95 * len(samples))) - 1)]
    return statistics.median(samples), p95


def profile_model(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    execution_provider: str = CPU_EP,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    intra_op_threads: int = 1,
) -> tuple[SegmentProfile, dict[str, np.ndarray]]:
    """Time ``model`` on ``execution_provider`` and return its profile and its outputs for ``feed``.

    The outputs let the caller feed the next segment real intermediate tensors.
    """
    sess = session(model, execution_provider, intra_op_threads=intra_op_threads)
    needed = {i.name for i in sess.get_inputs()}
    missing = sorted(needed - set(feed))
    if missing:
        raise PartitionError(f"no input data for {', '.join(missing)}")
    subset = {name: feed[name] for name in needed}
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, run(sess, names, subset), strict=True))
    median_ms, p95_ms = time_session(sess, subset, runs=runs, warmup=warmup)
    used = sess.get_providers()[0] if sess.get_providers() else CPU_EP
    return SegmentProfile(used, median_ms, p95_ms, runs), outputs
