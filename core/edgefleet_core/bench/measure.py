"""Fair latency comparison of several models on one machine, and a description of that machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.optimize.runtime import available_providers, session


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115 — short read, closed by GC
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "providers": available_providers(),
        "threads_per_session": 1,
    }


def compare_latency(
    models: Mapping[str, onnx.ModelProto],
    inputs: npt.NDArray[np.generic],
    *,
    rounds: int = 5,
    runs: int = 100,
    input_name: str = "input",
) -> dict[str, dict[str, float]]:
    """p50/p95 (ms) of single-sample inference per model, measured in interleaved rounds.

    Interleaving (round 1 of every model, then round 2 ...) spreads background load over all models
    alike, so ratios between them stay meaningful on a small shared machine; the p50 reported is the
    median over all runs of all rounds.
    """
    sessions = {name: session(model) for name, model in models.items()}
    outputs = {name: s.get_outputs()[0].name for name, s in sessions.items()}
    samples = [inputs[i % len(inputs)][None, ...] for i in range(runs)]
    timings: dict[str, list[float]] = {name: [] for name in models}
    for name, sess in sessions.items():  # warm up every session before any measurement
        for sample in samples[:10]:
            sess.run([outputs[name]], {input_name: sample})
    for _ in range(rounds):
        for name, sess in sessions.items():
            for sample in samples:
                start = time.perf_counter_ns()
                sess.run([outputs[name]], {input_name: sample})
                timings[name].append((time.perf_counter_ns() - start) / 1e6)
    return {
        name: {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)), "runs": float(len(t))}
        for name, t in timings.items()
    }


def accuracy(model: onnx.ModelProto, inputs: npt.NDArray[np.generic], labels: npt.NDArray[np.generic]) -> float:
    """Top-1 accuracy with ONNX Runtime on the CPU."""
    sess = session(model)
    logits = sess.run(None, {sess.get_inputs()[0].name: inputs})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))
