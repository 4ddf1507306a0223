"""The PyTorch trainer: fine-tunes an ONNX model's float initializers and keeps its graph.

One objective covers every training pass: ``alpha * T² * KL(teacher_T ‖ student_T) + (1 - alpha) *
task loss``, the soft-target term of Hinton et al. (the ``T²`` keeps its gradients on the scale of
the hard-label term) plus cross-entropy on class labels or MSE on regression targets. Without a
teacher only the task loss remains; without labels only the soft targets.

Runs are deterministic for a given seed: the only randomness is the shuffling of mini-batches,
drawn from ``numpy.random.default_rng(seed)``, and training uses one CPU thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
import torch.nn.functional as F

from edgefleet_core.errors import DataError, TrainingUnsupported
from edgefleet_core.optimize.data import Dataset, input_specs
from edgefleet_core.optimize.passes.base import TrainingRequest
from edgefleet_core.optimize.passes.graph_optimization import unfuse_cpu_fusions
from edgefleet_core.training import logits_name, run_model
from edgefleet_core.training.onnx_module import OnnxModule, write_back
from edgefleet_core.training.ops import Args, Node, Tensor

logger = logging.getLogger(__name__)

QUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""The layers ONNX Runtime's static quantizer turns into integer kernels; QAT simulates exactly those."""
CALIBRATION_SAMPLES = 256
"""Samples whose activation ranges initialize the fake quantizers, as the quantizer's calibration does."""
RANGE_MOMENTUM = 0.01
"""How fast the observed activation ranges follow the weights as they change."""
CHECK_SAMPLES = 1024
"""Samples on which the trained model's outputs must be finite."""


class FakeQuantizer:
    """Simulated INT8 for the layers QuantizeInt8 quantizes, with straight-through gradients.

    Weights of Conv/Gemm/MatMul: per output channel, symmetric int8 (scale ``max|w| / 127``, as
    the quantizer's per-channel mode). Their float activations, inputs and outputs (ONNX
    Runtime's QDQ format puts a quantize/dequantize pair on both): per tensor, asymmetric uint8
    over a range that always holds 0, first calibrated with min/max over the first samples, then
    followed by an exponential moving average while the weights change. Biases stay float: the
    quantizer stores them as int32 at a scale fine enough not to matter.
    """

    def __init__(self, module: OnnxModule) -> None:
        self._module = module
        self.ranges: dict[str, tuple[float, float]] = {}
        self.calibrating = False
        """Record min/max and leave values alone (the quantizer calibrates on the float model)."""

    def outputs(self, node: Node, results: list[Tensor]) -> list[Tensor]:
        if node.op_type not in QUANTIZED_OPS or results[0].dtype != torch.float32:
            return results
        return [self._activation(node.outputs[0], results[0]), *results[1:]]

    def inputs(self, node: Node, args: Args) -> Args:
        if node.op_type not in QUANTIZED_OPS:
            return args
        out = list(args)
        for slot in (0, 1):
            value = args[slot] if slot < len(args) else None
            if value is None or value.dtype != torch.float32:
                continue
            name = node.inputs[slot]
            if self._module.is_parameter(name):
                if not self.calibrating:
                    out[slot] = _fake_quantize_weight(value, _output_axis(node, slot, value))
            else:
                out[slot] = self._activation(name, value)
        return out

    def _activation(self, name: str, value: Tensor) -> Tensor:
        low, high = min(float(value.detach().min()), 0.0), max(float(value.detach().max()), 0.0)
        seen = self.ranges.get(name)
        if seen is None:
            self.ranges[name] = (low, high)
        elif self.calibrating:
            self.ranges[name] = (min(seen[0], low), max(seen[1], high))
        elif torch.is_grad_enabled():
            self.ranges[name] = (
                seen[0] + RANGE_MOMENTUM * (low - seen[0]),
                seen[1] + RANGE_MOMENTUM * (high - seen[1]),
            )
        if self.calibrating:
            return value
        low, high = self.ranges[name]
        scale = max((high - low) / 255.0, 1e-8)
        zero_point = int(min(max(round(-low / scale), 0), 255))
        return torch.fake_quantize_per_tensor_affine(value, scale, zero_point, 0, 255)


def _output_axis(node: Node, slot: int, weight: Tensor) -> int | None:
    """The axis of ``weight`` that indexes the layer's outputs; ``None`` for per-tensor."""
    if weight.dim() < 2:
        return None
    if node.op_type == "Conv":
        return 0 if slot == 1 else None
    if node.op_type == "ConvTranspose":
        return 1 if slot == 1 else None
    if node.op_type == "Gemm":
        transposed = node.attr_int("transB" if slot == 1 else "transA", 0)
        return (0 if transposed else 1) if slot == 1 else (1 if transposed else 0)
    return weight.dim() - 1 if slot == 1 else weight.dim() - 2  # MatMul


def _fake_quantize_weight(weight: Tensor, axis: int | None) -> Tensor:
    if axis is None:
        scale = max(float(weight.detach().abs().max()) / 127.0, 1e-8)
        return torch.fake_quantize_per_tensor_affine(weight, scale, 0, -127, 127)
    dims = [d for d in range(weight.dim()) if d != axis]
    scales = (weight.detach().abs().amax(dim=dims) / 127.0).clamp(min=1e-8)
    zero_points = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scales, zero_points, axis, -127, 127)


@dataclass(frozen=True)
class _Objective:
    alpha: float
    temperature: float
    classify: bool
    """Class logits on axis 1 (KL on soft targets, cross-entropy on labels), else values (MSE)."""

    def __call__(self, student: Tensor, teacher: Tensor | None, labels: Tensor | None) -> Tensor:
        loss = torch.zeros((), dtype=student.dtype)
        if teacher is not None and self.alpha > 0:
            if self.classify:
                t = self.temperature
                log_p_teacher = F.log_softmax(teacher / t, dim=1)
                log_p_student = F.log_softmax(student / t, dim=1)
                kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
                loss = loss + self.alpha * t * t * kl
            else:
                loss = loss + self.alpha * F.mse_loss(student, teacher)
        if labels is not None and self.alpha < 1:
            if self.classify:
                task = F.cross_entropy(student, labels)
            else:
                task = F.mse_loss(student.reshape(labels.shape), labels)
            loss = loss + (1 - self.alpha) * task
        return loss


def _is_class_labels(labels: npt.NDArray[np.generic]) -> bool:
    return bool(np.issubdtype(labels.dtype, np.integer))


def _objective(request: TrainingRequest, probe: Tensor, labels: npt.NDArray[np.generic] | None) -> _Objective:
    """Check that the labels fit the model's output and choose the losses."""
    has_classes = probe.dim() >= 2 and probe.shape[1] >= 2
    if labels is None:
        return _Objective(1.0, request.temperature, has_classes)
    alpha = request.alpha if request.teacher is not None else 0.0
    per_sample = tuple(probe.shape[1:])
    if _is_class_labels(labels):
        if not has_classes or tuple(labels.shape[1:]) != per_sample[1:]:
            raise TrainingUnsupported(
                f"class labels of shape {labels.shape} do not fit the model's logits of shape (N, {per_sample})"
            )
        classes = probe.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise TrainingUnsupported(f"class labels outside 0..{classes - 1}, the model's {classes} classes")
        return _Objective(alpha, request.temperature, True)
    if int(np.prod(labels.shape[1:])) != int(np.prod(per_sample)):
        raise TrainingUnsupported(f"targets of shape {labels.shape} do not fit the model's output (N, {per_sample})")
    return _Objective(alpha, request.temperature, False)


def _label_tensor(labels: npt.NDArray[np.generic]) -> Tensor:
    if _is_class_labels(labels):
        return torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(labels.astype(np.float32))


def _freeze_masks(module: OnnxModule) -> list[tuple[torch.nn.Parameter, Tensor]]:
    # Weight matrices and kernels only: pruning zeroes those. A bias or norm scale that is exactly
    # zero (e.g. a fresh zero-initialized bias) is a value to learn, not a removed connection.
    masks = []
    for parameter in module.weights.values():
        if parameter.dim() >= 2:
            mask = parameter.detach() != 0
            if not bool(mask.all()):
                masks.append((parameter, mask.to(parameter.dtype)))
    return masks


def _inputs(module: OnnxModule, data: Dataset) -> Mapping[str, npt.NDArray[np.generic]]:
    missing = [name for name in module.input_names if name not in data.inputs]
    if missing:
        raise DataError("<training data>", f"no arrays for model inputs {missing}")
    return {name: data.inputs[name] for name in module.input_names}


class TorchTrainer:
    """Implements the :class:`~edgefleet_core.optimize.passes.base.Trainer` protocol with PyTorch (Adam)."""

    def train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        """A copy of ``model`` with trained weights; raises :class:`TrainingUnsupported` when it cannot."""
        if request.epochs < 1 or request.batch_size < 1 or not request.learning_rate > 0:
            raise TrainingUnsupported(f"invalid training request {request}")
        if data.labels is None and request.teacher is None:
            raise TrainingUnsupported("nothing to learn from: no labels and no teacher")
        threads = torch.get_num_threads()
        # One thread: runs are reproducible, and training shares small machines with the rest.
        torch.set_num_threads(1)
        try:
            return self._train(model, data, request)
        finally:
            torch.set_num_threads(threads)

    def _train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        # A recipe may train after graph optimization: ONNX Runtime's CPU fusions (FusedConv ...)
        # are split back into standard, differentiable ops first; the result stays a valid model.
        model, _ = unfuse_cpu_fusions(model)
        module = OnnxModule(model)
        if not list(module.parameters()):
            raise TrainingUnsupported("the model has no float weights to train")
        inputs = _inputs(module, data)
        count = len(data)
        logits = logits_name(model)

        teacher: Tensor | None = None
        if request.teacher is not None:
            missing = [spec.name for spec in input_specs(request.teacher) if spec.name not in data.inputs]
            if missing:
                raise DataError("<training data>", f"no arrays for teacher inputs {missing}")
            (soft,) = run_model(request.teacher, data.inputs, [logits_name(request.teacher)], request.batch_size)
            teacher = torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32))
        labels = None if data.labels is None else _label_tensor(data.labels)

        with torch.no_grad():
            probe = module(_batch(inputs, np.arange(min(count, 2))), [logits])[0]
        if teacher is not None and tuple(teacher.shape[1:]) != tuple(probe.shape[1:]):
            raise TrainingUnsupported(
                f"the teacher's logits {tuple(teacher.shape[1:])} differ from the student's {tuple(probe.shape[1:])}"
            )
        objective = _objective(request, probe, data.labels)

        if request.fake_quantize:
            quantizer = FakeQuantizer(module)
            module.hook = quantizer
            quantizer.calibrating = True
            with torch.no_grad():
                for start in range(0, min(count, CALIBRATION_SAMPLES), request.batch_size):
                    module(_batch(inputs, np.arange(start, min(start + request.batch_size, count))))
            quantizer.calibrating = False

        masks = _freeze_masks(module) if request.freeze_zeros else []
        optimizer = torch.optim.Adam(module.parameters(), lr=request.learning_rate)
        rng = np.random.default_rng(request.seed)
        for epoch in range(request.epochs):
            total = 0.0
            order = rng.permutation(count)
            for start in range(0, count, request.batch_size):
                index = order[start : start + request.batch_size]
                student = module(_batch(inputs, index), [logits])[0]
                loss = objective(
                    student,
                    None if teacher is None else teacher[index],
                    None if labels is None else labels[index],
                )
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise TrainingUnsupported(f"training diverged: the loss became {value} in epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                for parameter, mask in masks:
                    if parameter.grad is not None:
                        parameter.grad.mul_(mask)
                optimizer.step()
                with torch.no_grad():
                    for parameter, mask in masks:
                        parameter.mul_(mask)
                total += value * len(index)
            logger.debug("epoch %d/%d: loss %.5f", epoch + 1, request.epochs, total / count)

        trained = write_back(module, model)
        _check_finite(trained, data)
        return trained


def _batch(
    inputs: Mapping[str, npt.NDArray[np.generic]], index: npt.NDArray[np.signedinteger[Any]]
) -> dict[str, Tensor]:
    # Fancy indexing copies, so torch gets writable arrays of its own.
    return {name: torch.from_numpy(np.ascontiguousarray(array[index])) for name, array in inputs.items()}


def _check_finite(model: onnx.ModelProto, data: Dataset) -> None:
    sample = data.take(CHECK_SAMPLES)
    names = [o.name for o in model.graph.output]
    for name, value in zip(names, run_model(model, sample.inputs, names), strict=True):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise TrainingUnsupported(f"training diverged: output {name!r} is not finite on the data")
