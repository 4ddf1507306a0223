"""Knowledge distillation: recover a compressed student's accuracy from the FP32 teacher.

The student (the model the recipe has pruned, factorized ... so far) is trained on the soft
targets of the recipe's source model (KL divergence at temperature T), mixed with the hard labels
when the data has them. Weights that are exactly zero stay zero, so a pruned student stays
pruned; put WeightClustering after this pass, since training moves the shared values apart.

The helpers below are shared with the quantization-aware training pass, which is distillation
under simulated INT8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.errors import PassNotApplicable, TrainingUnsupported
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.passes.base import (
    OptimizationPass,
    PassCapability,
    PassContext,
    PassResult,
    Trainer,
    TrainingRequest,
)
from edgefleet_core.resources.recipe import DistillationOptions, PassOptions
from edgefleet_core.training import logits_name, run_model

FloatArray = npt.NDArray[np.floating]

NO_TRAINER = "needs the train extra (pip install edgefleet[train])"
NO_DATA = "needs training data (samples of the model's inputs, --data DATA.npz)"


def training_setup(pass_type: str, ctx: PassContext) -> tuple[Trainer, Dataset]:
    """The trainer and data a training pass needs, or :class:`PassNotApplicable` saying which is missing."""
    if ctx.trainer is None:
        raise PassNotApplicable(pass_type, NO_TRAINER)
    if ctx.data is None or len(ctx.data) == 0:
        raise PassNotApplicable(pass_type, NO_DATA)
    return ctx.trainer, ctx.data


def train_or_skip(
    pass_type: str, trainer: Trainer, model: onnx.ModelProto, data: Dataset, request: TrainingRequest
) -> onnx.ModelProto:
    """Train, turning the trainer's refusal (an op it cannot run, divergence) into a skipped pass."""
    try:
        return trainer.train(model, data, request)
    except TrainingUnsupported as exc:
        raise PassNotApplicable(pass_type, f"cannot train this model: {exc.reason}") from exc


@dataclass(frozen=True)
class TeacherFit:
    """How close a student is to its teacher on the context's data."""

    loss: float
    """The training objective on the whole data set (soft-target KL·T² and task loss, as weighted)."""
    agreement: float | None
    """Share of samples whose top-1 class equals the teacher's; ``None`` when the output is not class logits."""


def _log_softmax(x: FloatArray) -> FloatArray:
    shifted = x - x.max(axis=1, keepdims=True)
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def teacher_fit(
    logits: FloatArray, teacher_logits: FloatArray, labels: npt.NDArray[np.generic] | None, request: TrainingRequest
) -> TeacherFit:
    """The objective of ``request`` and the top-1 agreement, for a student's logits on the data.

    The objective the trainer minimizes, computed again on ONNX Runtime's outputs so that the pass
    reports what the shipped model does, whichever trainer produced it.
    """
    student, teacher = logits.astype(np.float64), teacher_logits.astype(np.float64)
    classes = student.ndim >= 2 and student.shape[1] >= 2
    alpha = request.alpha if labels is not None else 1.0
    if classes:
        t = request.temperature
        log_p_teacher, log_p_student = _log_softmax(teacher / t), _log_softmax(student / t)
        soft = float((np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(axis=1).mean() * t * t)
    else:
        soft = float(np.mean((student - teacher) ** 2))
    loss = alpha * soft
    if labels is not None and alpha < 1:
        if classes and np.issubdtype(labels.dtype, np.integer):
            picked = np.take_along_axis(_log_softmax(student), labels.astype(np.int64)[:, None, ...], axis=1)
            task = float(-picked.mean())
        else:
            targets = labels.astype(np.float64)
            task = float(np.mean((student.reshape(targets.shape) - targets) ** 2))
        loss += (1 - alpha) * task
    agreement = float(np.mean(student.argmax(axis=1) == teacher.argmax(axis=1))) if classes else None
    return TeacherFit(loss, agreement)


def _logits(pass_type: str, model: onnx.ModelProto, data: Dataset, batch_size: int) -> FloatArray:
    try:
        (logits,) = run_model(model, data.inputs, [logits_name(model)], batch_size)
    except KeyError as exc:
        raise PassNotApplicable(pass_type, f"the data has no array for model input {exc}") from None
    return logits


def distil(
    pass_type: str, model: onnx.ModelProto, ctx: PassContext, request: TrainingRequest
) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Train ``model`` as ``request`` says and measure it against the teacher before and after."""
    trainer, data = training_setup(pass_type, ctx)
    if request.teacher is None:
        raise PassNotApplicable(pass_type, "distillation needs a teacher")
    teacher_logits = _logits(pass_type, request.teacher, data, request.batch_size)
    student_logits = _logits(pass_type, model, data, request.batch_size)
    if teacher_logits.shape != student_logits.shape:
        raise PassNotApplicable(
            pass_type, f"the teacher's outputs {teacher_logits.shape} differ from the student's {student_logits.shape}"
        )
    before = teacher_fit(student_logits, teacher_logits, data.labels, request)
    trained = train_or_skip(pass_type, trainer, model, data, request)
    after = teacher_fit(_logits(pass_type, trained, data, request.batch_size), teacher_logits, data.labels, request)
    metrics = {
        "epochs": float(request.epochs),
        "alpha": request.alpha,
        "temperature": request.temperature,
        "loss_before": before.loss,
        "loss_after": after.loss,
    }
    if before.agreement is not None and after.agreement is not None:
        metrics["agreement_before"] = before.agreement
        metrics["agreement_after"] = after.agreement
    return trained, metrics


class DistillationPass(OptimizationPass[DistillationOptions]):
    """Train the student on the FP32 teacher's soft targets (and the labels, when there are some)."""

    pass_type: ClassVar[str] = "Distillation"
    options_type: ClassVar[type[PassOptions]] = DistillationOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "Fine-tunes the float weights of the compressed model on the FP32 source model's soft targets "
            "(KL at temperature T, mixed with hard labels when present) to recover accuracy; pruned zeros "
            "stay zero and the graph is unchanged. Approximate; needs the train extra and data."
        ),
        needs_data=True,
        needs_trainer=True,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        _, data = training_setup(self.pass_type, ctx)
        options = self.options
        notes: list[str] = []
        alpha = options.alpha
        if data.labels is None and alpha < 1:
            notes.append(f"the data has no labels: trained on the teacher's soft targets only (alpha 1.0, not {alpha})")
            alpha = 1.0
        request = TrainingRequest(
            epochs=options.epochs,
            learning_rate=options.learning_rate,
            batch_size=options.batch_size,
            teacher=ctx.source,
            temperature=options.temperature,
            alpha=alpha,
            freeze_zeros=True,
            seed=ctx.seed,
        )
        trained, metrics = distil(self.pass_type, model, ctx, request)
        if "agreement_after" in metrics:
            before, after = metrics["agreement_before"], metrics["agreement_after"]
            notes.append(f"top-1 agreement with the teacher {before:.4f} → {after:.4f} after {options.epochs} epochs")
        ctx.logger.info("%s: loss %.5f → %.5f", self.pass_type, metrics["loss_before"], metrics["loss_after"])
        return PassResult(trained, notes, metrics)
