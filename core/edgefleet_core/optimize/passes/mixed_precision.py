"""Mixed precision: INT8 everywhere it pays, FP32 where quantizing hurts accuracy or speed.

The search is ours on purpose (ONNX Runtime's quantizer only takes a list of nodes to leave in
float; deciding which is the product's job). It quantizes everything, measures, and only when the
result misses the accuracy budget or is not faster than FP32 does it analyse nodes one by one:

* **Sensitivity method: leave one out.** For each quantized Conv/MatMul/Gemm node, the model with
  everything quantized *except that node* is scored and timed. This measures what keeping the
  node in FP32 buys in the configuration that will ship, with all the other nodes' quantization
  error present (quantizing one node alone would miss how errors compound), and one variant per
  node answers both the accuracy and the speed question. Calibration runs once and is shared by
  every variant, so a variant costs one quantizer run and one or two evaluator calls.
* **Greedy repair.** Nodes are kept in FP32 in order of the score they recover until the score
  drop is within budget, each step measured on the real combined model, not predicted. Nodes
  whose leave-one-out variant is faster than the current model are quantized at a loss: they stay
  in FP32. If the final mix is still not faster than the FP32 input, the input is returned
  unchanged — on some CPUs ONNX Runtime's INT8 kernels are slower than its FP32 ones, and the
  pipeline must find that out, not assume it.
* Big models cap the analysis at :data:`MAX_PROBES` nodes per question (see :func:`probe_order`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.graph import initializer_map
from edgefleet_core.optimize.passes.base import Evaluator, OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.optimize.passes.graph_optimization import unfuse_cpu_fusions
from edgefleet_core.optimize.passes.quantize import Int8Quantizer, QuantizedModel, is_quantized, plan_quantization
from edgefleet_core.resources.recipe import MixedPrecisionOptions, QuantizeInt8Options

MAX_PROBES = 24
"""Most leave-one-out variants built per question (accuracy, speed): bounds the cost on big models."""
SPEED_NOISE = 0.01
"""A node's quantization is judged not to pay only when keeping it in FP32 saves more than this
fraction of the model's latency: smaller differences are within a latency median's noise."""


@dataclass
class _Variant:
    quantized: QuantizedModel
    score: float | None = None
    latency_ms: float | None = None
    timed: bool = False


class _Search:
    """Builds and measures quantized variants, each once (keyed by the nodes kept in FP32)."""

    def __init__(self, quantizer: Int8Quantizer, evaluator: Evaluator) -> None:
        self._quantizer = quantizer
        self._evaluator = evaluator
        self._variants: dict[frozenset[str], _Variant] = {}

    @property
    def built(self) -> int:
        return len(self._variants)

    def variant(self, keep_fp32: Collection[str]) -> _Variant:
        key = frozenset(keep_fp32)
        found = self._variants.get(key)
        if found is None:
            found = _Variant(self._quantizer.quantize(key))
            self._variants[key] = found
        return found

    def score(self, keep_fp32: Collection[str]) -> float:
        found = self.variant(keep_fp32)
        if found.score is None:
            found.score = float(self._evaluator.score(found.quantized.model))
        return found.score

    def latency_ms(self, keep_fp32: Collection[str]) -> float | None:
        found = self.variant(keep_fp32)
        if not found.timed:
            found.latency_ms = self._evaluator.latency_ms(found.quantized.model)
            found.timed = True
        return found.latency_ms


def _weight_sizes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, int]:
    inits = initializer_map(model)
    by_name = {node.name: node for node in model.graph.node}
    return {name: sum(int(np.prod(inits[i].dims)) for i in by_name[name].input if i in inits) for name in names}


def probe_order(candidates: list[str], sizes: dict[str, int], *, for_speed: bool) -> list[str]:
    """The nodes to analyse, in graph order: all of them, or :data:`MAX_PROBES` chosen by likelihood.

    For accuracy: the first and last nodes (they see raw inputs and produce the outputs, the usual
    sensitive spots), then the largest weights. For speed: the smallest weights first, where
    quantizing and dequantizing activations costs more than the integer kernel saves.
    """
    if len(candidates) <= MAX_PROBES:
        return list(candidates)
    if for_speed:
        chosen = sorted(candidates, key=lambda n: sizes[n])[:MAX_PROBES]
    else:
        ends = [candidates[0], candidates[-1]]
        rest = sorted((n for n in candidates if n not in ends), key=lambda n: -sizes[n])
        chosen = [*ends, *rest][:MAX_PROBES]
    picked = set(chosen)
    return [n for n in candidates if n in picked]


class _Decision:
    """One run of the search for one model: which nodes stay FP32, and why."""

    def __init__(
        self, model: onnx.ModelProto, ctx: PassContext, evaluator: Evaluator, search: _Search, quantizer: Int8Quantizer
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.evaluator = evaluator
        self.search = search
        self.candidates = list(search.variant(()).quantized.quantized)
        self.sizes = _weight_sizes(quantizer.prepared.model, self.candidates)
        self.how = quantizer.plan.describe()
        self.notes = [*quantizer.plan.notes, *quantizer.prepared.notes]
        self.keep: dict[str, str] = {}
        """Nodes kept in FP32, in the order they were chosen, with the reason."""
        self.fp32_score = float(evaluator.score(model))
        self.metrics = {"score_fp32": self.fp32_score, "score_all_int8": search.score(())}

    def _probes(self, nodes: list[str], question: str, *, for_speed: bool) -> list[str]:
        probes = probe_order(nodes, self.sizes, for_speed=for_speed)
        if len(probes) < len(nodes):
            self.notes.append(f"{question} analysis limited to {len(probes)} of {len(nodes)} layers")
        return probes

    def over_budget(self, score: float) -> bool:
        return self.fp32_score - score > self.ctx.max_accuracy_drop

    def repair_accuracy(self) -> bool:
        """Keep the nodes that recover the most score in FP32 until the drop fits; ``False`` if none fits."""
        all_int8 = self.search.score(())
        budget = self.ctx.max_accuracy_drop
        if not self.over_budget(all_int8):
            self.notes.append(
                f"all-INT8 score drop {self.fp32_score - all_int8:.4g} is within the budget of {budget:g}"
            )
            return True
        probes = self._probes(self.candidates, "accuracy", for_speed=False)
        gain = {n: self.search.score({n}) - all_int8 for n in probes}
        for node in sorted(probes, key=lambda n: -gain[n]):  # stable: graph order on ties
            if len(self.keep) == len(self.candidates) - 1:
                return False  # keeping this one too would leave nothing in INT8: not a mix
            self.keep[node] = f"quantizing it cost {gain[node]:.4g} of score"
            if not self.over_budget(self.search.score(self.keep)):
                return True
        return False

    def repair_speed(self) -> bool | None:
        """Keep the nodes whose INT8 form is slower in FP32; whether the result beats FP32 (``None``: not timed)."""
        fp32 = self.evaluator.latency_ms(self.model)
        if fp32 is None:
            self.notes.append(f"speed not checked: {self.ctx.execution_provider} cannot run here to be timed")
            return None
        self.metrics["latency_ms_fp32"] = fp32
        latency = self.search.latency_ms(self.keep)
        if latency is not None and latency >= fp32:
            remaining = [n for n in self.candidates if n not in self.keep]
            slow: dict[str, float] = {}
            for node in self._probes(remaining, "speed", for_speed=True):
                without = self.search.latency_ms({*self.keep, node})
                if without is not None and latency - without > SPEED_NOISE * latency:
                    slow[node] = latency - without
            for node, saved in slow.items():
                self.keep[node] = f"INT8 made the model {saved:.3g} ms slower"
            latency = self.search.latency_ms(self.keep)
        if latency is None:
            return None
        self.metrics["latency_ms_mixed"] = latency
        if latency >= fp32:
            self.notes.append(
                f"INT8 is slower than FP32 here ({latency:.3g} ms vs {fp32:.3g} ms FP32 "
                f"on {self.ctx.execution_provider})"
            )
            return False
        return True

    def fp32_result(self, why: str) -> PassResult:
        # The input comes back as a copy: the caller may change the result, never the input.
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(self.model)
        self.notes.append(why)
        self.metrics |= {
            "nodes_quantized": 0.0,
            "nodes_kept_fp32": float(len(self.candidates)),
            "variants_built": float(self.search.built),
        }
        return PassResult(unchanged, self.notes, self.metrics)

    def mixed_result(self) -> PassResult:
        chosen = self.search.variant(self.keep)
        if not chosen.quantized.quantized:
            return self.fp32_result("every quantizable layer had to stay FP32; kept the FP32 model")
        score = self.search.score(self.keep)
        self.notes.extend(f"kept {node} in FP32: {why}" for node, why in self.keep.items())
        quantized = len(chosen.quantized.quantized)
        self.notes.append(
            f"quantized {quantized} of {len(self.candidates)} layers ({self.how}); "
            f"score {score:.4g} vs {self.fp32_score:.4g} FP32"
        )
        self.metrics |= {
            "score_mixed": score,
            "nodes_quantized": float(quantized),
            "nodes_kept_fp32": float(len(self.keep)),
            "variants_built": float(self.search.built),
        }
        return PassResult(chosen.quantized.model, self.notes, self.metrics)


class MixedPrecisionPass(OptimizationPass[MixedPrecisionOptions]):
    """INT8 quantization that keeps accuracy-sensitive or slow-when-quantized layers in FP32.

    Quantizes like :class:`~edgefleet_core.optimize.passes.quantize.QuantizeInt8Pass` with its
    default options, then searches (see the module docstring). The evaluator scores on the data
    the pipeline gave it (``sensitivity_samples`` of the evaluation data) and times on the target
    EP; this pass only compares its numbers.
    """

    pass_type: ClassVar[str] = "MixedPrecision"
    options_type: ClassVar[type[MixedPrecisionOptions]] = MixedPrecisionOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "INT8 quantization with per-layer sensitivity analysis: layers that cost accuracy or run slower "
            "when quantized stay FP32; returns the FP32 model when INT8 does not pay at all"
        ),
        execution_providers=None,
        precision="int8",
        needs_data=True,
        exact=False,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Quantize a copy of ``model``, keeping in FP32 what the evaluator shows does not pay."""
        if is_quantized(model):
            raise PassNotApplicable(self.pass_type, "already quantized")
        if ctx.data is None:
            raise PassNotApplicable(self.pass_type, "needs data for calibration and sensitivity analysis")
        if ctx.evaluator is None:
            raise PassNotApplicable(self.pass_type, "needs an evaluator to measure sensitivity")
        # The FP32 answer is the input as given; only the quantizer sees ONNX Runtime's fusions split.
        standard, unfused = unfuse_cpu_fusions(model)
        plan = plan_quantization(self.pass_type, standard, QuantizeInt8Options(), ctx.execution_provider, ctx.data)
        with Int8Quantizer(self.pass_type, standard, plan, ctx.data) as quantizer:
            decision = _Decision(model, ctx, ctx.evaluator, _Search(quantizer, ctx.evaluator), quantizer)
            decision.notes[:0] = unfused
            if not decision.candidates:
                raise PassNotApplicable(self.pass_type, "ONNX Runtime's quantizer quantized no Conv/MatMul/Gemm node")
            result = self._decide(decision)
        ctx.logger.info("MixedPrecision: %s", result.notes[-1])
        return result

    def _decide(self, decision: _Decision) -> PassResult:
        budget = decision.ctx.max_accuracy_drop
        if not decision.repair_accuracy():
            return decision.fp32_result(
                f"no mix of INT8 and FP32 layers stays within the accuracy budget of {budget:g}; kept the FP32 model"
            )
        if self.options.require_speedup:
            faster = decision.repair_speed()
            if faster is False:
                return decision.fp32_result("kept the FP32 model: INT8 does not pay on this EP")
            if faster and decision.over_budget(decision.search.score(decision.keep)):
                return decision.fp32_result(
                    f"no mix of INT8 and FP32 layers is both within the accuracy budget of {budget:g} and faster "
                    "than FP32; kept the FP32 model"
                )
        return decision.mixed_result()
