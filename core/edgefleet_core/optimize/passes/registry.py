"""Every optimization pass by its type name (the CRD's pass enum), in one explicit table.

A test keeps this table, the CRD enum, the options models and the docs' pass table in step.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefleet_core.optimize.passes.base import OptimizationPass
from edgefleet_core.optimize.passes.clustering import WeightClusteringPass
from edgefleet_core.optimize.passes.distillation import DistillationPass
from edgefleet_core.optimize.passes.fp16 import FP16Pass
from edgefleet_core.optimize.passes.graph_optimization import GraphOptimizationPass
from edgefleet_core.optimize.passes.low_rank import LowRankFactorizationPass
from edgefleet_core.optimize.passes.mixed_precision import MixedPrecisionPass
from edgefleet_core.optimize.passes.pruning import ChannelPruningPass, MagnitudePruningPass
from edgefleet_core.optimize.passes.qat import QuantizationAwareTrainingPass
from edgefleet_core.optimize.passes.quantize import QuantizeInt8Pass
from edgefleet_core.resources.recipe import PassOptions, PassSpec

PASSES: Mapping[str, type[OptimizationPass[PassOptions]]] = {
    cls.pass_type: cls  # type: ignore[misc]
    for cls in (
        GraphOptimizationPass,
        FP16Pass,
        QuantizeInt8Pass,
        MixedPrecisionPass,
        QuantizationAwareTrainingPass,
        MagnitudePruningPass,
        ChannelPruningPass,
        LowRankFactorizationPass,
        WeightClusteringPass,
        DistillationPass,
    )
}


def create_pass(spec: PassSpec) -> OptimizationPass[PassOptions]:
    """The pass a recipe entry names, with its typed options (defaults where the entry has none)."""
    return PASSES[spec.type](spec.options)
