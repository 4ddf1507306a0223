"""Fine-tuning ONNX models with PyTorch, the optional ``train`` extra (``pip install edgefleet[train]``).

Importing this package never imports torch: :func:`load_trainer` does, and answers ``None`` when
torch is not installed, so the rest of the pipeline runs without it and the passes that train
report themselves as not applicable. The other helpers here need only ONNX Runtime; the trainer
and the training passes share them so that both see the same logits.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.optimize.runtime import session

if TYPE_CHECKING:
    from edgefleet_core.optimize.data import Dataset
    from edgefleet_core.optimize.passes.base import Trainer, TrainingRequest

FloatArray = npt.NDArray[np.floating]


class _DeferredTorchTrainer:
    """The PyTorch trainer, imported at the first training rather than when a process starts.

    Importing torch takes seconds; an operator that starts (or restarts after a crash) and builds
    recipes without training should not wait for it.
    """

    def __init__(self) -> None:
        self._trainer: Trainer | None = None

    def train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        if self._trainer is None:
            from edgefleet_core.training.trainer import TorchTrainer  # noqa: PLC0415 - torch is optional

            self._trainer = TorchTrainer()
        return self._trainer.train(model, data, request)


def load_trainer(*, deferred: bool = False) -> Trainer | None:
    """The PyTorch trainer, or ``None`` when torch cannot be imported.

    ``deferred``: decide from whether torch is installed and import it at the first training.
    """
    if deferred:
        return _DeferredTorchTrainer() if importlib.util.find_spec("torch") is not None else None
    try:
        from edgefleet_core.training.trainer import TorchTrainer  # noqa: PLC0415 - torch is optional
    except ImportError:
        return None
    return TorchTrainer()


def logits_name(model: onnx.ModelProto) -> str:
    """The tensor holding the model's logits: the first output, or the input of a final Softmax.

    Soft targets and cross-entropy want logits; a classifier exported with its Softmax (which
    saturates and flattens the gradients) is trained on what goes into it instead.
    """
    first = model.graph.output[0].name
    for node in model.graph.node:
        if first in node.output and node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            return node.input[0]
    return first


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (for ONNX Runtime to fetch them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))  # ORT infers the type
    return out


def run_model(
    model: onnx.ModelProto, inputs: Mapping[str, npt.NDArray[np.generic]], names: Sequence[str], batch_size: int = 256
) -> list[FloatArray]:
    """The tensors ``names`` of ``model`` on every sample of ``inputs``, batched, with ONNX Runtime."""
    runner = session(with_outputs(model, names))
    feeds = [i.name for i in runner.get_inputs()]
    count = int(next(iter(inputs.values())).shape[0])
    parts: list[list[FloatArray]] = [[] for _ in names]
    for start in range(0, count, batch_size):
        batch = {name: inputs[name][start : start + batch_size] for name in feeds}
        for part, value in zip(parts, runner.run(list(names), batch), strict=True):
            part.append(np.asarray(value))
    return [np.concatenate(part) for part in parts]
