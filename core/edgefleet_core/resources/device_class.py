"""DeviceClass: a hardware profile of the fleet (cluster-scoped)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from edgefleet_core.resources.base import (
    GROUP_VERSION,
    UNIQUE_ITEMS,
    Conditions,
    LabelSelector,
    ObjectMeta,
    Quantity,
    ResourceModel,
    quantity_bytes,
)
from edgefleet_core.resources.recipe import Recipe

Arch = Literal["x86_64", "arm64", "armv7", "riscv64"]
IsaFeature = Literal[
    "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx",
    "neon", "dotprod", "i8mm", "fp16", "bf16", "sve", "sve2",
]  # fmt: skip
ExecutionProvider = Literal[
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
    "OpenVINOExecutionProvider", "QNNExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "NnapiExecutionProvider", "XnnpackExecutionProvider", "ACLExecutionProvider",
    "ArmNNExecutionProvider",
]  # fmt: skip
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]


def _default_precisions() -> list[Precision]:
    return ["fp32"]


class CpuSpec(ResourceModel):
    """The node CPU, which always runs at least the head of a partitioned model."""

    arch: Arch
    cores: Annotated[int, Field(ge=1, le=1024)]
    isa_features: Annotated[list[IsaFeature], Field(max_length=32), UNIQUE_ITEMS] | None = None


class AcceleratorLink(ResourceModel):
    """The link between node CPU and accelerator: the partition planner's transfer cost."""

    # The alias is spelled out: "MBps" (megabytes per second) is not what to_camel makes of it.
    bandwidth_mbps: Annotated[float, Field(gt=0, le=1000000, alias="bandwidthMBps")]
    latency_microseconds: Annotated[float, Field(ge=0, le=10000000)] = 0

    def transfer_seconds(self, nbytes: int) -> float:
        """Modelled time to move ``nbytes`` across the link once."""
        return self.latency_microseconds * 1e-6 + nbytes / (self.bandwidth_mbps * 1e6)


class AcceleratorSpec(ResourceModel):
    """An accelerator next to the node CPU."""

    type: Literal["gpu", "npu", "tpu", "dsp", "vpu", "fpga"]
    model: Annotated[str, StringConstraints(max_length=128)] | None = None
    execution_provider: ExecutionProvider
    memory: Quantity | None = None
    link: AcceleratorLink | None = None


class DeviceClassSpec(ResourceModel):
    """The hardware profile and how devices are matched to it."""

    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    cpu: CpuSpec
    memory: Quantity
    accelerator: AcceleratorSpec | None = None
    precisions: Annotated[list[Precision], Field(min_length=1, max_length=5), UNIQUE_ITEMS] = Field(
        default_factory=_default_precisions
    )
    selector: LabelSelector
    default_recipe: Recipe | None = None

    @property
    def memory_bytes(self) -> int:
        """Memory available to models, in bytes."""
        return quantity_bytes(self.memory)


class DeviceClassStatus(ResourceModel):
    """Observed state, written by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    devices: Annotated[int, Field(ge=0)] | None = None
    conditions: Conditions | None = None


class DeviceClass(ResourceModel):
    """A class of edge devices with the same hardware profile."""

    api_version: Literal["edgefleet.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["DeviceClass"] = "DeviceClass"
    metadata: ObjectMeta
    spec: DeviceClassSpec
    status: DeviceClassStatus | None = None
