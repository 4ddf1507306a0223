"""Optimization recipes: ordered passes, each with typed options.

A pass entry is a Kubernetes-style discriminated union: ``type`` names the pass and the field of
the same name in camelCase holds its options (``{type: QuantizeInt8, quantizeInt8: {mode: static}}``).
The CRD expresses the union with CEL rules; :class:`PassSpec` enforces the same rules here.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from edgefleet_core.resources.base import ResourceModel

PassType = Literal[
    "GraphOptimization",
    "FP16",
    "QuantizeInt8",
    "MixedPrecision",
    "QuantizationAwareTraining",
    "MagnitudePruning",
    "ChannelPruning",
    "LowRankFactorization",
    "WeightClustering",
    "Distillation",
]


class GraphOptimizationOptions(ResourceModel):
    """ONNX Runtime offline graph optimization (constant folding, fusions) for the target EP."""

    level: Literal["basic", "extended", "layout", "all"] = "extended"


class FP16Options(ResourceModel):
    """Convert weights and activations to FP16."""

    keep_io_types: bool = True
    op_block_list: Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=64)] | None = None


class QuantizeInt8Options(ResourceModel):
    """INT8 post-training quantization."""

    mode: Literal["auto", "static", "dynamic"] = "auto"
    format: Literal["auto", "qdq", "qoperator"] = "auto"
    per_channel: bool = True
    calibration_samples: Annotated[int, Field(ge=1, le=100000)] = 128
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["int8", "uint8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"


class MixedPrecisionOptions(ResourceModel):
    """Per-layer sensitivity analysis that keeps harmful or slow-when-quantized layers in higher precision."""

    sensitivity_samples: Annotated[int, Field(ge=1, le=100000)] = 64
    require_speedup: bool = True


class QuantizationAwareTrainingOptions(ResourceModel):
    """Quantization-aware fine-tuning (needs the ``train`` extra)."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 3
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.0001
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64


class MagnitudePruningOptions(ResourceModel):
    """Unstructured magnitude pruning to a sparsity target."""

    sparsity: Annotated[float, Field(ge=0, le=0.99)] = 0.5
    steps: Annotated[int, Field(ge=1, le=100)] = 1
    fine_tune_epochs: Annotated[int, Field(ge=0, le=1000)] = 0


class ChannelPruningOptions(ResourceModel):
    """Structured pruning that removes Conv output channels and rewires their consumers."""

    ratio: Annotated[float, Field(ge=0, le=0.9)] = 0.25
    criterion: Literal["l1", "l2"] = "l1"
    steps: Annotated[int, Field(ge=1, le=100)] = 1
    fine_tune_epochs: Annotated[int, Field(ge=0, le=1000)] = 1


class LowRankFactorizationOptions(ResourceModel):
    """SVD of MatMul/Gemm weights; Tucker, CP or spatial SVD of Conv weights."""

    method: Literal["svd", "tucker", "cp", "spatialSvd"] = "svd"
    energy: Annotated[float, Field(gt=0, le=1)] = 0.95
    rank_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    min_parameters: Annotated[int, Field(ge=0, le=1000000000)] = 4096


class WeightClusteringOptions(ResourceModel):
    """k-means weight sharing with k = 2^bits; feeds the bundle's Huffman coding."""

    bits: Annotated[int, Field(ge=1, le=8)] = 4
    per_channel: bool = False


class DistillationOptions(ResourceModel):
    """Train the compressed student on the FP32 teacher's soft targets (KL with temperature)."""

    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.7
    epochs: Annotated[int, Field(ge=1, le=1000)] = 5
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.001
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64


PassOptions = (
    GraphOptimizationOptions
    | FP16Options
    | QuantizeInt8Options
    | MixedPrecisionOptions
    | QuantizationAwareTrainingOptions
    | MagnitudePruningOptions
    | ChannelPruningOptions
    | LowRankFactorizationOptions
    | WeightClusteringOptions
    | DistillationOptions
)

OPTIONS_BY_PASS: dict[str, type[PassOptions]] = {
    "GraphOptimization": GraphOptimizationOptions,
    "FP16": FP16Options,
    "QuantizeInt8": QuantizeInt8Options,
    "MixedPrecision": MixedPrecisionOptions,
    "QuantizationAwareTraining": QuantizationAwareTrainingOptions,
    "MagnitudePruning": MagnitudePruningOptions,
    "ChannelPruning": ChannelPruningOptions,
    "LowRankFactorization": LowRankFactorizationOptions,
    "WeightClustering": WeightClusteringOptions,
    "Distillation": DistillationOptions,
}
"""The options model of each pass type."""


MEMBER_BY_PASS: dict[str, str] = {
    "GraphOptimization": "graph_optimization",
    "FP16": "fp16",
    "QuantizeInt8": "quantize_int8",
    "MixedPrecision": "mixed_precision",
    "QuantizationAwareTraining": "quantization_aware_training",
    "MagnitudePruning": "magnitude_pruning",
    "ChannelPruning": "channel_pruning",
    "LowRankFactorization": "low_rank_factorization",
    "WeightClustering": "weight_clustering",
    "Distillation": "distillation",
}
"""The attribute of :class:`PassSpec` that holds each pass type's options (spelled out: the
names do not follow one mechanical rule, e.g. ``FP16`` → ``fp16``, ``QuantizeInt8`` → ``quantize_int8``)."""


def member_field(pass_type: str) -> str:
    """The Python attribute of :class:`PassSpec` holding a pass type's options."""
    return MEMBER_BY_PASS[pass_type]


class PassSpec(ResourceModel):
    """One pass of a recipe: its type and, optionally, its options."""

    type: PassType
    graph_optimization: GraphOptimizationOptions | None = None
    fp16: FP16Options | None = None
    quantize_int8: QuantizeInt8Options | None = None
    mixed_precision: MixedPrecisionOptions | None = None
    quantization_aware_training: QuantizationAwareTrainingOptions | None = None
    magnitude_pruning: MagnitudePruningOptions | None = None
    channel_pruning: ChannelPruningOptions | None = None
    low_rank_factorization: LowRankFactorizationOptions | None = None
    weight_clustering: WeightClusteringOptions | None = None
    distillation: DistillationOptions | None = None

    @model_validator(mode="after")
    def _one_member(self) -> Self:
        # Mirrors the CRD's CEL rules: only the member named by `type` may be set.
        own = member_field(self.type)
        for pass_type in OPTIONS_BY_PASS:
            field = member_field(pass_type)
            if field != own and getattr(self, field) is not None:
                raise ValueError(f"{to_camel(field)} may only be set when type is {pass_type}")
        return self

    @property
    def options(self) -> PassOptions:
        """The pass's options, with the CRD's defaults when the member is absent."""
        given: PassOptions | None = getattr(self, member_field(self.type))
        return given if given is not None else OPTIONS_BY_PASS[self.type]()


class Recipe(ResourceModel):
    """An ordered list of optimization passes."""

    passes: Annotated[list[PassSpec], Field(min_length=1, max_length=16)]
