"""The contract every optimization pass implements.

A pass is a class with a typed options model (from :mod:`edgefleet_core.resources.recipe`, the
same one the CRD validates), a capability record, and one method that turns a model into a new
model. A pass that cannot apply to a given model raises :class:`PassNotApplicable`; the pipeline
reports it and goes on with the rest of the recipe.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import onnx

from edgefleet_core.optimize.data import Dataset
from edgefleet_core.resources.recipe import PassOptions

OptionsT = TypeVar("OptionsT", bound=PassOptions)


@dataclass(frozen=True)
class TrainingRequest:
    """What a pass asks the trainer to do with a model and the context's data."""

    epochs: int
    learning_rate: float
    batch_size: int
    teacher: onnx.ModelProto | None = None
    """Distil from this model's outputs (soft targets) when set."""
    temperature: float = 4.0
    """Softmax temperature of the soft targets."""
    alpha: float = 1.0
    """Weight of the soft-target loss; ``1 - alpha`` weighs the hard labels (needs labels)."""
    freeze_zeros: bool = False
    """Keep weights that are exactly zero at zero (pruned models stay pruned)."""
    fake_quantize: bool = False
    """Simulate INT8 weights and activations in the forward pass (quantization-aware training)."""
    seed: int = 0


class Trainer(Protocol):
    """Fine-tunes an ONNX model's float initializers in place of the graph; provided with the ``train`` extra."""

    def train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        """A copy of ``model`` with trained weights and the same graph."""
        ...


class Evaluator(Protocol):
    """Scores candidate models on the context's data; used by passes that search (mixed precision)."""

    def score(self, model: onnx.ModelProto) -> float:
        """The task metric of ``model`` where higher is better (accuracy, agreement, negative error)."""
        ...

    def latency_ms(self, model: onnx.ModelProto) -> float | None:
        """Median latency of one sample on the target EP, ``None`` when that EP cannot run here."""
        ...


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model: the target, the data, the source model, helpers."""

    execution_provider: str
    """The device class's target execution provider (``CPUExecutionProvider`` for CPU-only classes)."""
    precisions: frozenset[str]
    """Precisions the class runs well (``fp32``, ``fp16``, ``int8`` ...)."""
    source: onnx.ModelProto
    """The FP32 model the recipe started from: the teacher for distillation."""
    data: Dataset | None = None
    """Calibration, sensitivity and training samples; ``None`` when the user gave none."""
    trainer: Trainer | None = None
    """``None`` without the ``train`` extra; passes that need it then do not apply."""
    evaluator: Evaluator | None = None
    max_accuracy_drop: float = 0.01
    """The accuracy budget, as a drop of the score."""
    seed: int = 0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("edgefleet.optimize"))


@dataclass
class PassResult:
    """A transformed model and what the pass did."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    """Human-readable facts, e.g. ``pruned 24 of 64 channels of conv2``."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Numbers worth reporting, e.g. ``sparsity``, ``parameters_before``, ``parameters_after``."""


@dataclass(frozen=True)
class PassCapability:
    """What a pass is for and what it needs; the planner and the docs read it."""

    summary: str
    execution_providers: frozenset[str] | None = None
    """Providers whose kernels benefit from the pass's output; ``None`` for all."""
    precision: str | None = None
    """The precision the pass produces (``int8``, ``fp16``), or ``None`` when it keeps precision."""
    needs_data: bool = False
    needs_trainer: bool = False
    exact: bool = False
    """Outputs equal the input model's up to floating-point rounding."""


class OptimizationPass(ABC, Generic[OptionsT]):
    """Base of every pass: ``pass_type`` matches the CRD's pass enum, options come typed."""

    pass_type: ClassVar[str]
    options_type: ClassVar[type[PassOptions]]
    capability: ClassVar[PassCapability]

    def __init__(self, options: OptionsT) -> None:
        if not isinstance(options, self.options_type):
            raise TypeError(f"{self.pass_type} takes {self.options_type.__name__}, not {type(options).__name__}")
        self.options: OptionsT = options

    @abstractmethod
    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Transform ``model`` (never modified in place) or raise :class:`PassNotApplicable`."""
