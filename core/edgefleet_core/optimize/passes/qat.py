"""Quantization-aware fine-tuning: prepare FP32 weights for the INT8 quantizer that follows.

When post-training quantization misses the accuracy budget, fine-tuning under simulated INT8
moves the weights to values that survive rounding, and the activations to ranges that quantize
well, so the QuantizeInt8 pass after it loses less.
"""

from __future__ import annotations

from typing import ClassVar

import onnx

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.passes.base import (
    OptimizationPass,
    PassCapability,
    PassContext,
    PassResult,
    TrainingRequest,
)
from edgefleet_core.optimize.passes.distillation import distil, training_setup
from edgefleet_core.optimize.passes.quantize import is_quantized
from edgefleet_core.resources.recipe import PassOptions, QuantizationAwareTrainingOptions

TEMPERATURE = 2.0
"""Soft-target temperature. Lower than distillation's usual 4: the student starts as the teacher,
and QAT must keep its confident decisions rather than learn the teacher's dark knowledge anew."""
ALPHA_WITH_LABELS = 0.5
"""Weight of the teacher's soft targets when the data also has labels (the rest goes to the labels)."""


class QuantizationAwareTrainingPass(OptimizationPass[QuantizationAwareTrainingOptions]):
    """Fine-tune under simulated INT8, distilling from the FP32 source model (and labels when present).

    The forward pass fake-quantizes what ONNX Runtime's static quantizer will quantize: the
    weights of Conv/Gemm/MatMul per output channel (symmetric int8) and their activation inputs per
    tensor (asymmetric uint8 over observed ranges), with straight-through gradients. The output is
    still an FP32 model, with the fine-tuned float weights: the recipe must put QuantizeInt8 after
    this pass, and a model that is already quantized is refused. Pruned zeros stay zero.
    """

    pass_type: ClassVar[str] = "QuantizationAwareTraining"
    options_type: ClassVar[type[PassOptions]] = QuantizationAwareTrainingOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "Fine-tunes the FP32 weights under simulated INT8 (fake-quantized Conv/Gemm/MatMul weights and "
            "activations, straight-through gradients) against the FP32 source model's soft targets and the labels, "
            "so the QuantizeInt8 pass that must follow loses less accuracy. Output stays FP32; needs the train "
            "extra and data."
        ),
        needs_data=True,
        needs_trainer=True,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if is_quantized(model):
            raise PassNotApplicable(
                self.pass_type, "the model is already quantized: put QuantizationAwareTraining before QuantizeInt8"
            )
        _, data = training_setup(self.pass_type, ctx)
        options = self.options
        request = TrainingRequest(
            epochs=options.epochs,
            learning_rate=options.learning_rate,
            batch_size=options.batch_size,
            teacher=ctx.source,
            temperature=TEMPERATURE,
            alpha=1.0 if data.labels is None else ALPHA_WITH_LABELS,
            freeze_zeros=True,
            fake_quantize=True,
            seed=ctx.seed,
        )
        trained, metrics = distil(self.pass_type, model, ctx, request)
        notes = [
            f"fine-tuned {options.epochs} epochs under simulated INT8 "
            + ("on the teacher's soft targets" if data.labels is None else "on the teacher's soft targets and labels")
        ]
        if "agreement_after" in metrics:
            notes.append(
                f"FP32 top-1 agreement with the teacher {metrics['agreement_before']:.4f} → "
                f"{metrics['agreement_after']:.4f}; quantize with QuantizeInt8 next"
            )
        return PassResult(trained, notes, metrics)
