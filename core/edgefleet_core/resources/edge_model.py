"""EdgeModel: one model to optimize, sign, roll out and run across device classes."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from edgefleet_core.resources.base import (
    GROUP_VERSION,
    UNIQUE_ITEMS,
    Conditions,
    Duration,
    LabelSelector,
    ObjectMeta,
    ResourceModel,
    ResourceName,
    Sha256Hex,
    SourceUri,
    Timestamp,
    unique_by,
)
from edgefleet_core.resources.recipe import Recipe

RolloutPhase = Literal["Pending", "Progressing", "Paused", "Succeeded", "RolledBack", "Failed"]
Version = Annotated[str, StringConstraints(max_length=64)]
Message = Annotated[str, StringConstraints(max_length=32768)]
TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ShortName = Annotated[str, StringConstraints(max_length=64)]


class ModelSource(ResourceModel):
    """The trained FP32 model."""

    uri: SourceUri
    sha256: Sha256Hex
    format: Literal["onnx"] = "onnx"


class Targets(ResourceModel):
    """Device classes to build variants for, by name, by label selector, or both."""

    device_classes: Annotated[list[ResourceName], Field(max_length=64), UNIQUE_ITEMS] | None = None
    selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        # The CRD says minProperties: 1.
        if self.device_classes is None and self.selector is None:
            raise ValueError("targets must name deviceClasses or give a selector")
        return self


class RecipeOverride(ResourceModel):
    """A recipe that replaces the model's recipe for one device class."""

    device_class: ResourceName
    recipe: Recipe


class Optimization(ResourceModel):
    """How variants are produced."""

    objective: Literal["latency", "size", "balanced"] = "balanced"
    recipe: Recipe | None = None
    overrides: (
        Annotated[list[RecipeOverride], Field(max_length=64), unique_by(lambda o: o.device_class, "deviceClass")] | None
    ) = None

    def recipe_for(self, device_class: str) -> Recipe | None:
        """The recipe for one class: its override, else the model's recipe (``None``: use the class default)."""
        for override in self.overrides or []:
            if override.device_class == device_class:
                return override.recipe
        return self.recipe


class EvaluationData(ResourceModel):
    """Samples (and, optionally, labels) to evaluate candidates on."""

    uri: SourceUri
    sha256: Sha256Hex
    format: Literal["npz"] = "npz"
    samples: Annotated[int, Field(ge=1, le=1000000)] | None = None


class AccuracyBudget(ResourceModel):
    """The accuracy budget every variant must meet, measured against the FP32 model."""

    metric: Literal["top1", "top1Agreement", "meanAbsoluteError"] | None = None
    max_drop: Annotated[float, Field(ge=0, le=1)] = 0.01
    evaluation_data: EvaluationData | None = None


class PartitionPolicy(ResourceModel):
    """Whether and where to split the model between the node CPU and the accelerator."""

    policy: Literal["auto", "off", "manual"] = "auto"
    objective: Literal["latency", "throughput"] = "latency"
    cut: Annotated[list[TensorName], Field(max_length=32), UNIQUE_ITEMS] | None = None

    @model_validator(mode="after")
    def _cut_fits_policy(self) -> Self:
        # Mirrors the CRD's CEL rules on spec.partition.
        if self.policy == "manual" and not self.cut:
            raise ValueError("cut must name at least one tensor when policy is manual")
        if self.policy != "manual" and self.cut is not None:
            raise ValueError("cut may only be set when policy is manual")
        return self


def _waves_increase_to_100(waves: list[RolloutWave]) -> list[RolloutWave]:
    # Mirrors the CRD's CEL rules on spec.rollout.waves, and reports at the same field.
    percents = [w.percent for w in waves]
    if any(b <= a for a, b in pairwise(percents)):
        raise ValueError("wave percents must be strictly increasing")
    if percents and percents[-1] != 100:
        raise ValueError("the last wave must reach 100 percent")
    return waves


class RolloutWave(ResourceModel):
    """One wave: the cumulative share of a class's devices updated, and the pause after its gate."""

    percent: Annotated[int, Field(ge=1, le=100)]
    pause: Duration = "0s"


def _default_waves() -> list[RolloutWave]:
    return [RolloutWave(percent=10, pause="60s"), RolloutWave(percent=50, pause="60s"), RolloutWave(percent=100)]


class HealthGates(ResourceModel):
    """What a wave must show before the next starts."""

    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    max_p95_latency_ratio: Annotated[float, Field(ge=1, le=100)] = 1.5
    min_healthy_ratio: Annotated[float, Field(ge=0, le=1)] = 0.9
    min_install_success_ratio: Annotated[float, Field(ge=0, le=1)] = 0.9
    observation_window: Duration = "60s"
    min_reports: Annotated[int, Field(ge=1, le=1000)] = 3


class RolloutPolicy(ResourceModel):
    """How a new version reaches the devices of each class."""

    waves: Annotated[list[RolloutWave], Field(min_length=1, max_length=10), AfterValidator(_waves_increase_to_100)] = (
        Field(default_factory=_default_waves)
    )
    health_gates: HealthGates = Field(default_factory=HealthGates)
    auto_rollback: bool = True


class EdgeModelSpec(ResourceModel):
    """What the user wants: a source model, targets, and how to optimize and roll it out."""

    source: ModelSource
    task: Literal["classification", "detection", "segmentation", "regression", "embedding", "other"] = "classification"
    targets: Targets
    optimization: Optimization | None = None
    accuracy: AccuracyBudget | None = None
    partition: PartitionPolicy | None = None
    rollout: RolloutPolicy | None = None
    paused: bool = False
    artifact_policy: Literal["Retain", "Delete"] = "Retain"


class LatencySummary(ResourceModel):
    """Measured latency percentiles, in milliseconds."""

    p50: Annotated[float, Field(ge=0)] | None = None
    p95: Annotated[float, Field(ge=0)] | None = None


class VariantPartition(ResourceModel):
    """The partition plan chosen for a variant."""

    cut: Annotated[list[Annotated[str, StringConstraints(max_length=256)]], Field(max_length=32)] | None = None
    head_execution_provider: ShortName | None = None
    tail_execution_provider: ShortName | None = None
    predicted_latency_ms: Annotated[float, Field(ge=0)] | None = None


class Variant(ResourceModel):
    """The optimized variant built for one device class."""

    device_class: Annotated[str, StringConstraints(max_length=253)]
    version: Version
    digest: Annotated[str, StringConstraints(pattern=r"^sha256:[a-f0-9]{64}$")]
    size_bytes: Annotated[int, Field(ge=0)]
    transport_size_bytes: Annotated[int, Field(ge=0)] | None = None
    compression_ratio: Annotated[float, Field(ge=0)] | None = None
    execution_provider: ShortName | None = None
    passes: Annotated[list[ShortName], Field(max_length=16)] | None = None
    latency_ms: LatencySummary | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    partition: VariantPartition | None = None
    bundle: Annotated[str, StringConstraints(max_length=2048)] | None = None


class ClassRollout(ResourceModel):
    """Rollout progress in one device class."""

    device_class: Annotated[str, StringConstraints(max_length=253)]
    version: Version | None = None
    previous_version: Version | None = None
    phase: RolloutPhase
    wave: Annotated[int, Field(ge=0)] | None = None
    waves: Annotated[int, Field(ge=0)] | None = None
    devices: Annotated[int, Field(ge=0)] | None = None
    updated: Annotated[int, Field(ge=0)] | None = None
    healthy: Annotated[int, Field(ge=0)] | None = None
    failed: Annotated[int, Field(ge=0)] | None = None
    rolled_back: Annotated[int, Field(ge=0)] | None = None
    last_transition_time: Timestamp | None = None
    message: Message | None = None


class EdgeModelStatus(ResourceModel):
    """Observed state, written by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    version: Version | None = None
    classes: Annotated[int, Field(ge=0)] | None = None
    rollout_phase: RolloutPhase | None = None
    conditions: Conditions | None = None
    variants: (
        Annotated[list[Variant], Field(max_length=64), unique_by(lambda v: v.device_class, "deviceClass")] | None
    ) = None
    rollout: (
        Annotated[list[ClassRollout], Field(max_length=64), unique_by(lambda r: r.device_class, "deviceClass")] | None
    ) = None


class EdgeModel(ResourceModel):
    """A model to optimize, sign, roll out and run on edge device classes."""

    api_version: Literal["edgefleet.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["EdgeModel"] = "EdgeModel"
    metadata: ObjectMeta
    spec: EdgeModelSpec
    status: EdgeModelStatus | None = None
