"""EdgeDevice: one enrolled device, created by the gateway at enrollment."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from edgefleet_core.resources.base import (
    GROUP_VERSION,
    UNIQUE_ITEMS,
    Conditions,
    ObjectMeta,
    Quantity,
    ResourceModel,
    ResourceName,
    Sha256Hex,
    Timestamp,
    unique_by,
)
from edgefleet_core.resources.device_class import Arch

ModelState = Literal["Downloading", "Verifying", "Installing", "SelfTest", "Active", "RolledBack", "Failed"]
HealthState = Literal["Healthy", "Degraded", "Unhealthy", "Unknown"]


class DeviceIdentity(ResourceModel):
    """Who the device is; its mTLS client certificate proves it."""

    device_id: Annotated[
        str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    ]
    certificate_sha256: Sha256Hex
    certificate_not_after: Timestamp | None = None


class DeviceHardware(ResourceModel):
    """Facts the agent reported at enrollment."""

    arch: Arch | None = None
    cpu_cores: Annotated[int, Field(ge=1, le=1024)] | None = None
    memory: Quantity | None = None
    execution_providers: (
        Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=16), UNIQUE_ITEMS] | None
    ) = None


class EdgeDeviceSpec(ResourceModel):
    """The device's class, identity and hardware; ``revoked`` is the user's switch."""

    device_class: ResourceName
    identity: DeviceIdentity
    hardware: DeviceHardware | None = None
    revoked: bool = False


class InstalledModel(ResourceModel):
    """A model on the device and the state of its A/B slots."""

    model: Annotated[str, StringConstraints(max_length=317)]
    version: Annotated[str, StringConstraints(max_length=64)] | None = None
    previous_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    slot: Literal["a", "b"] | None = None
    state: ModelState
    message: Annotated[str, StringConstraints(max_length=32768)] | None = None
    updated_at: Timestamp | None = None


class DeviceHealth(ResourceModel):
    """The latest health summary of a device."""

    state: HealthState
    reported_at: Timestamp | None = None
    cpu_percent: Annotated[float, Field(ge=0, le=100)] | None = None
    memory_used_bytes: Annotated[int, Field(ge=0)] | None = None
    memory_total_bytes: Annotated[int, Field(ge=0)] | None = None
    disk_free_bytes: Annotated[int, Field(ge=0)] | None = None
    inferences: Annotated[int, Field(ge=0)] | None = None
    p50_ms: Annotated[float, Field(ge=0)] | None = None
    p95_ms: Annotated[float, Field(ge=0)] | None = None
    error_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    accelerator_fallbacks: Annotated[int, Field(ge=0)] | None = None
    energy_joules: Annotated[float, Field(ge=0)] | None = None


class EdgeDeviceStatus(ResourceModel):
    """Observed state, written by the gateway at a bounded rate."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    last_seen: Timestamp | None = None
    conditions: Conditions | None = None
    models: Annotated[list[InstalledModel], Field(max_length=64), unique_by(lambda m: m.model, "model")] | None = None
    health: DeviceHealth | None = None


class EdgeDevice(ResourceModel):
    """An enrolled edge device."""

    api_version: Literal["edgefleet.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["EdgeDevice"] = "EdgeDevice"
    metadata: ObjectMeta
    spec: EdgeDeviceSpec
    status: EdgeDeviceStatus | None = None
