"""Accuracy of a model on the test split, and a description of the machine figures come from."""

from __future__ import annotations

import os
import platform
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
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
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


def accuracy(model: onnx.ModelProto, inputs: npt.NDArray[np.generic], labels: npt.NDArray[np.generic]) -> float:
    """Top-1 accuracy with ONNX Runtime on the CPU."""
    sess = session(model)
    logits = sess.run(None, {sess.get_inputs()[0].name: inputs})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))
