"""Pruning: unstructured magnitude pruning, and structured channel pruning that removes filters.

Both prune in ``steps`` increments of the target (``target * k / steps``) and, when the options ask
for fine-tuning and the context has a trainer and data, fine-tune after every step — distilling
from the FP32 source model — so the network recovers before more is taken away (the iterative
schedule of Han et al., 2015). Without a trainer or data the pass still prunes and says why it
could not fine-tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.errors import PassNotApplicable, TrainingUnsupported
from edgefleet_core.optimize.graph import get_array, parameter_count, set_array
from edgefleet_core.optimize.passes._channels import (
    GraphIndex,
    apply_plan,
    batch_norm_gain,
    filter_scores,
    plan_channels,
    static_shapes,
)
from edgefleet_core.optimize.passes._surgery import all_names, reference_counts, weight_uses
from edgefleet_core.optimize.passes.base import (
    OptimizationPass,
    PassCapability,
    PassContext,
    PassResult,
    TrainingRequest,
)
from edgefleet_core.resources.recipe import ChannelPruningOptions, DistillationOptions, MagnitudePruningOptions

MIN_PRUNABLE_ELEMENTS = 128
"""Weights smaller than this are left dense: they hold little of the size and much of the accuracy."""

_RECOVERY = DistillationOptions()
"""Learning rate, batch size and temperature of recovery fine-tuning: the pruning options do not
carry them, and the distillation defaults are the settings we already stand behind."""


@dataclass
class RecoveryTuner:
    """Fine-tunes a pruned model between steps when it can, and remembers once why it cannot."""

    epochs: int
    ctx: PassContext
    freeze_zeros: bool
    rounds: int = 0
    unavailable: str | None = None

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` fine-tuned, or ``model`` itself when fine-tuning is off or impossible."""
        if self.epochs == 0 or self.unavailable is not None:
            return model
        trainer, data = self.ctx.trainer, self.ctx.data
        if trainer is None:
            self.unavailable = "no trainer (install the 'train' extra)"
            return model
        if data is None:
            self.unavailable = "no training data"
            return model
        request = TrainingRequest(
            epochs=self.epochs,
            learning_rate=_RECOVERY.learning_rate,
            batch_size=_RECOVERY.batch_size,
            teacher=self.ctx.source,
            temperature=_RECOVERY.temperature,
            # Soft targets only when there are no labels; otherwise mix them half and half.
            alpha=1.0 if data.labels is None else 0.5,
            freeze_zeros=self.freeze_zeros,
            seed=self.ctx.seed,
        )
        try:
            tuned = trainer.train(model, data, request)
        except TrainingUnsupported as exc:
            self.unavailable = f"the trainer cannot train this model ({exc.reason})"
            return model
        self.rounds += 1
        return tuned

    def note(self) -> str | None:
        """Why fine-tuning that was asked for did not happen, if it did not."""
        if self.epochs and self.unavailable is not None:
            return f"pruned without fine-tuning: {self.unavailable}"
        return None


def magnitude_mask(weight: npt.NDArray[np.generic], sparsity: float) -> npt.NDArray[np.bool_]:
    """Which entries of ``weight`` survive: all but the ``ceil(sparsity * size)`` smallest in magnitude.

    A stable sort makes ties (and so the result) deterministic; entries already zero rank first.
    """
    # Round up: asking for 90 % sparsity must give at least 90 %, never 89.9999 %. The tiny
    # epsilon keeps float noise (0.9 * 10240 = 9216.000000000002) from adding a whole weight.
    count = min(weight.size, math.ceil(sparsity * weight.size - 1e-9))
    keep = np.ones(weight.size, dtype=bool)
    if count > 0:
        order = np.argsort(np.abs(weight.astype(np.float64)).ravel(), kind="stable")
        keep[order[:count]] = False
    return keep.reshape(weight.shape)


class MagnitudePruningPass(OptimizationPass[MagnitudePruningOptions]):
    """Zero the smallest-magnitude weights of every Conv/Gemm/MatMul layer to a sparsity target.

    Ranking is per layer, not global: every pruned tensor reaches the target sparsity. A global
    threshold compares magnitudes across layers whose scales differ by orders of magnitude (the
    first conv vs. a wide classifier) and can wipe out a small layer entirely, disconnecting the
    network; per-layer ranking cannot, and makes the achieved sparsity predictable.
    The FP32 file keeps its size (zeros are stored densely): the saving comes from the bundle's
    compression and from clustering, which keeps zeros exactly zero.
    """

    pass_type: ClassVar[str] = "MagnitudePruning"
    options_type: ClassVar[type[MagnitudePruningOptions]] = MagnitudePruningOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "Unstructured magnitude pruning of Conv/Gemm/MatMul weights to a sparsity target, per layer, "
            "in steps with optional distillation fine-tuning between them; shrinks the compressed bundle, "
            "not FP32 latency."
        ),
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        notes: list[str] = []
        targets = self._targets(out, notes)
        if not targets:
            raise PassNotApplicable(
                self.pass_type,
                f"no unshared float Conv/Gemm/MatMul weight of at least {MIN_PRUNABLE_ELEMENTS} elements",
            )
        tuner = RecoveryTuner(self.options.fine_tune_epochs, ctx, freeze_zeros=True)
        steps = self.options.steps
        masks: dict[str, npt.NDArray[np.bool_]] = {}
        for step in range(1, steps + 1):
            level = self.options.sparsity * step / steps
            for name in targets:
                weight = get_array(out, name)
                masks[name] = magnitude_mask(weight, level) & (weight != 0)
                set_array(out, name, np.where(masks[name], weight, 0).astype(weight.dtype))
            rounds = tuner.rounds
            out = tuner(out)
            if tuner.rounds > rounds:
                # freeze_zeros asks the trainer to keep pruned weights at zero; re-applying the mask
                # makes the reported sparsity a fact rather than a promise.
                for name, mask in masks.items():
                    weight = get_array(out, name)
                    set_array(out, name, np.where(mask, weight, 0).astype(weight.dtype))
        note = tuner.note()
        if note:
            notes.append(note)
        total = sum(int(mask.size) for mask in masks.values())
        zeros = sum(int(np.count_nonzero(get_array(out, name) == 0)) for name in targets)
        notes.append(f"pruned {len(targets)} weight tensors to {zeros / total:.1%} sparsity in {steps} step(s)")
        return PassResult(
            out,
            notes,
            {
                "sparsity": zeros / total,
                "parameters": float(total),
                "zeros": float(zeros),
                "pruned_tensors": float(len(targets)),
                "fine_tune_rounds": float(tuner.rounds),
            },
        )

    @staticmethod
    def _targets(model: onnx.ModelProto, notes: list[str]) -> list[str]:
        refs = reference_counts(model)
        sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
        names = list(dict.fromkeys(use.name for use in weight_uses(model)))
        shared = [name for name in names if refs[name] > 1]
        small = [name for name in names if sizes[name] < MIN_PRUNABLE_ELEMENTS]
        if shared:
            # A weight read by several layers (tied embeddings, reused blocks) is left dense: its
            # importance is spread over uses that per-layer magnitude cannot see.
            notes.append(f"left {len(shared)} shared weight tensor(s) dense: {', '.join(shared[:5])}")
        if small:
            notes.append(f"left {len(small)} weight tensor(s) under {MIN_PRUNABLE_ELEMENTS} elements dense")
        return [name for name in names if name not in shared and name not in small]


class ChannelPruningPass(OptimizationPass[ChannelPruningOptions]):
    """Remove the least important output filters of Conv layers and rewire their consumers.

    The removed channels are gone from the graph: the Conv has fewer filters (and bias entries),
    the BatchNormalization after it fewer parameters, the next Conv fewer input channels, a
    classifier after Flatten fewer rows — so FLOPs, file size and latency all drop. A Conv whose
    channels cannot be cut exactly (residual Add/Concat, graph output, grouped Conv, unknown op)
    is left as it is, with a note.
    """

    pass_type: ClassVar[str] = "ChannelPruning"
    options_type: ClassVar[type[ChannelPruningOptions]] = ChannelPruningOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "Structured filter pruning: removes the lowest-norm output channels of Conv layers and rewires "
            "BatchNormalization, activations, pools, the next Conv or the classifier after Flatten; fewer "
            "FLOPs and a smaller file. Optional distillation fine-tuning between steps."
        ),
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        shapes = static_shapes(out)
        convs = [n.output[0] for n in out.graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]
        skipped: dict[str, str] = {}
        index = GraphIndex(out, shapes)
        for name in convs:
            plan = plan_channels(index, self._conv(index, name))
            if isinstance(plan, str):
                skipped[name] = plan
        prunable = [name for name in convs if name not in skipped]
        if not prunable:
            reasons = "; ".join(
                f"{self._conv(index, name).name or name}: {why}" for name, why in list(skipped.items())[:3]
            )
            raise PassNotApplicable(self.pass_type, f"no Conv output channel can be removed exactly ({reasons})")
        original = {name: self._channels(out, name) for name in prunable}
        macs_before = _conv_macs(out, shapes)
        parameters_before = parameter_count(out)
        taken = all_names(out)
        tuner = RecoveryTuner(self.options.fine_tune_epochs, ctx, freeze_zeros=False)
        for step in range(1, self.options.steps + 1):
            level = self.options.ratio * step / self.options.steps
            for name in prunable:
                self._prune(out, shapes=shapes, name=name, original=original[name], level=level, taken=taken)
            out = tuner(out)
        labels = {n.output[0]: n.name or n.output[0] for n in out.graph.node if n.op_type == "Conv"}
        notes = [f"kept all channels of {labels[name]}: {why}" for name, why in skipped.items()]
        after = {name: self._channels(out, name) for name in prunable}
        notes.extend(f"{labels[name]}: {original[name]} → {after[name]} channels" for name in prunable)
        note = tuner.note()
        if note:
            notes.append(note)
        metrics = {
            "parameters_before": float(parameters_before),
            "parameters_after": float(parameter_count(out)),
            "channels_before": float(sum(original[name] for name in prunable)),
            "channels_after": float(sum(after.values())),
            "pruned_convs": float(sum(after[name] < original[name] for name in prunable)),
            "skipped_convs": float(len(skipped)),
            "fine_tune_rounds": float(tuner.rounds),
        }
        macs_after = _conv_macs(out, shapes)
        if macs_before is not None and macs_after is not None:
            metrics["conv_macs_before"] = float(macs_before)
            metrics["conv_macs_after"] = float(macs_after)
        return PassResult(out, notes, metrics)

    def _prune(
        self,
        model: onnx.ModelProto,
        *,
        shapes: dict[str, tuple[int | None, ...]],
        name: str,
        original: int,
        level: float,
        taken: set[str],
    ) -> None:
        # The index is rebuilt per Conv: cutting one may copy shared initializers under new names.
        index = GraphIndex(model, shapes)
        plan = plan_channels(index, self._conv(index, name))
        if isinstance(plan, str):  # the graph is the same as when it was planned; a trainer keeps it
            return
        target = max(1, original - round(level * original))
        remove = plan.channels - target
        if remove <= 0:
            return
        weight = get_array(model, plan.conv.input[1])
        scores = filter_scores(weight, self.options.criterion, batch_norm_gain(index, plan))
        order = np.argsort(scores, kind="stable")
        keep = np.sort(order[remove:]).astype(np.int64)
        apply_plan(model, plan, keep, taken)

    @staticmethod
    def _conv(index: GraphIndex, output: str) -> onnx.NodeProto:
        return next(n for n in index.model.graph.node if n.op_type == "Conv" and n.output[0] == output)

    @staticmethod
    def _channels(model: onnx.ModelProto, output: str) -> int:
        conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.output[0] == output)
        return int(next(init.dims[0] for init in model.graph.initializer if init.name == conv.input[1]))


def _conv_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...]]) -> int | None:
    """Multiply-accumulates of all Convs per sample, when every output's spatial size is known."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        shape = shapes.get(node.output[0])
        if shape is None or node.input[1] not in sizes or any(not d for d in shape[2:]):
            return None
        total += sizes[node.input[1]] * int(np.prod([d or 0 for d in shape[2:]]))
    return total
