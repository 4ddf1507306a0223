"""The records the fleet state keeps in the artifact store, one JSON object per key.

Parsed once on the way in (pydantic, unknown fields refused, immutable), so a record that reaches
the gateway or the CLI is well-formed; a malformed one is refused where it is read, naming its key.
Names follow Kubernetes: namespaces and device names are DNS-1123 labels (so ``<namespace>.<name>``
is a unique device id), device classes and models DNS-1123 subdomains. Datetimes are UTC-aware.

A device's status (when it was last seen, which models it serves, how they do) is not kept on its
:class:`DeviceRecord`: it is the device's merged health record (:class:`DeviceHealthRecord`, merged
from every gateway replica's :class:`ReplicaHealth` shard), whose ``updated_at`` is the last report
and whose ``last_window`` lists the models served.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

from edgefleet_core.bundle.manifest import VERSION_PATTERN
from edgefleet_core.resources.base import DNS_SUBDOMAIN_PATTERN, SHA256_HEX_PATTERN
from edgefleet_core.signing.layout import is_safe_path

DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
TOKEN_ID_PATTERN: Final = r"^[0-9a-f]{16}$"  # noqa: S105  (a pattern, not a secret)
REPLICA_ID_PATTERN: Final = r"^[a-z0-9-]{1,63}$"

Action = Literal["install", "rollback", "remove"]
Outcome = Literal["succeeded", "failed", "rolled_back", "refused_verification"]
Phase = Literal["download", "verify", "decode", "activate", "self_test"]
Slot = Literal["a", "b"]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
"""A point in time with a zone, stored as UTC (naive datetimes are refused: their zone is a guess)."""
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN)]
"""A namespace or device name."""
DnsName = Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
"""A device class or model name."""
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN)]


def _safe_target_path(value: str) -> str:
    if not is_safe_path(value):
        raise ValueError(f"{value!r} is not a relative path of [A-Za-z0-9._-] segments without '.' or '..'")
    return value


TargetPath = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_safe_target_path)]
Count = Annotated[int, Field(ge=0)]
Revision = Annotated[int, Field(ge=1)]
Millis = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Measure = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def device_id(namespace: str, name: str) -> str:
    """The device id: ``<namespace>.<name>``, unique because neither part may contain a dot."""
    return f"{namespace}.{name}"


def model_key(model_namespace: str, model_name: str) -> str:
    """Key of a model in :attr:`DeviceAssignments.assignments`: ``<namespace>/<model>``."""
    return f"{model_namespace}/{model_name}"


def totals_key(model_namespace: str, model_name: str, version: str) -> str:
    """Key of a model version in :attr:`DeviceHealthRecord.totals`: ``<namespace>/<model>@<version>``."""
    return f"{model_namespace}/{model_name}@{version}"


class FleetRecord(BaseModel):
    """Immutable, unknown fields refused, every field validated (also defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# ---------------------------------------------------------------------------------------------- tokens


class TokenUse(FleetRecord):
    """One enrollment a token was spent on."""

    device_name: DnsLabel
    device_id: str
    used_at: UtcDatetime


class BootstrapToken(FleetRecord):
    """A bootstrap token as stored: the secret only as its sha256, so the store never holds a usable token."""

    token_id: Annotated[str, StringConstraints(pattern=TOKEN_ID_PATTERN)]
    secret_sha256: Sha256Hex
    namespace: DnsLabel
    device_class: DnsName
    device_name: DnsLabel | None
    """A pinned device name: the device enrolls under this name whatever it asks for."""
    expires_at: UtcDatetime
    uses_left: Count
    used_by: list[TokenUse]


# --------------------------------------------------------------------------------------------- devices


class DeviceRecord(FleetRecord):
    """An enrolled device: who it is, what it runs on, which certificate is its current one."""

    device_id: str
    namespace: DnsLabel
    name: DnsLabel
    device_class: DnsName
    labels: dict[str, str]
    hardware: dict[str, JsonValue]
    agent_version: str
    cert_serial: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,40}$")]
    """Serial of the device's current certificate, lowercase hex."""
    cert_not_after: UtcDatetime
    key_sha256: Sha256Hex | None = None
    """sha256 of the device key's SubjectPublicKeyInfo (DER): an enrollment retried within the
    token's grace must come from the same key, or it would hand this identity to another device."""
    previous_cert_serial: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,40}$")] | None = None
    """Serial the last renewal replaced; still accepted until ``renewed_at`` + the renewal grace,
    so a device whose Renew response was lost is not locked out."""
    renewed_at: UtcDatetime | None = None
    revoked: bool = False
    enrolled_at: UtcDatetime

    def accepts(self, serial: str, now: datetime, renewal_grace: timedelta) -> bool:
        """Whether a certificate with ``serial`` is this device's: the current one, or the one the
        last renewal replaced while its grace lasts. Revocation is judged separately."""
        if serial == self.cert_serial:
            return True
        return (
            serial == self.previous_cert_serial
            and self.renewed_at is not None
            and now - self.renewed_at < renewal_grace
        )

    @model_validator(mode="after")
    def _id_is_namespace_dot_name(self) -> Self:
        if self.device_id != device_id(self.namespace, self.name):
            raise ValueError(f"device_id {self.device_id!r} is not {device_id(self.namespace, self.name)!r}")
        return self


# ----------------------------------------------------------------------------------------- assignments


class WaveRef(FleetRecord):
    """Which rollout wave an assignment belongs to."""

    index: Count
    count: Annotated[int, Field(ge=1)]
    percent: Annotated[int, Field(ge=0, le=100)]


class AssignmentChange(FleetRecord):
    """Which devices one assignment revision touched, so a gateway re-reads only those on a new HEAD."""

    revision: Revision
    namespace: DnsLabel
    names: list[DnsLabel]


class AssignmentRecord(FleetRecord):
    """What one device should do with one model, as of ``revision``."""

    revision: Revision
    model_namespace: DnsLabel
    model_name: DnsName
    version: Version
    action: Action
    target_paths: list[TargetPath]
    """TUF target paths: the bundle manifest first, then its payloads in manifest order."""
    bundle_sha256: Sha256Hex | Literal[""]
    """sha256 of the manifest target's bytes; empty for ``remove`` (nothing is fetched)."""
    bundle_length: Count
    """Sum of the signed lengths of every target in ``target_paths``."""
    delta_from_version: Version | None = None
    wave: WaveRef | None = None

    @model_validator(mode="after")
    def _bundle_matches_action(self) -> Self:
        if self.action == "remove":
            if self.target_paths or self.bundle_sha256 or self.bundle_length:
                raise ValueError("a remove assignment names no bundle (no target paths, digest or length)")
        elif not self.target_paths or not self.bundle_sha256:
            raise ValueError(f"an {self.action} assignment needs the bundle's target paths and digest")
        return self


class DeviceAssignments(FleetRecord):
    """A device's current assignments, one per model (a later one for the same model replaces it)."""

    namespace: DnsLabel
    name: DnsLabel
    assignments: dict[str, AssignmentRecord]
    """Keyed by :func:`model_key`."""

    @model_validator(mode="after")
    def _keys_name_their_model(self) -> Self:
        for key, record in self.assignments.items():
            if key != model_key(record.model_namespace, record.model_name):
                raise ValueError(f"assignment under {key!r} is for {record.model_namespace}/{record.model_name}")
        return self

    @property
    def revision(self) -> int:
        """The highest revision among the assignments (0 if none)."""
        return max((a.revision for a in self.assignments.values()), default=0)


# --------------------------------------------------------------------------------------------- health


class ModelWindow(FleetRecord):
    """One model version's figures over one reporting window."""

    model_namespace: DnsLabel
    model_name: DnsName
    version: Version
    slot: Slot | None
    inference_count: Count
    """Every inference request served in the window, failed ones included."""
    error_count: Count
    """Of those, the ones that failed."""
    latency_p50_ms: Millis
    latency_p95_ms: Millis
    latency_p99_ms: Millis
    accelerator_fallback_count: Count


class HealthWindow(FleetRecord):
    """A device's latest reporting window."""

    window_start: UtcDatetime
    window_seconds: Measure
    cpu_percent: Measure
    memory_used_bytes: Count
    memory_total_bytes: Count
    disk_used_bytes: Count
    disk_total_bytes: Count
    models: list[ModelWindow]
    energy_joules: Measure | None = None


class InstallRecord(FleetRecord):
    """The outcome of one assignment on one device."""

    revision: Revision
    model_namespace: DnsLabel
    model_name: DnsName
    from_version: str
    """The version active before (empty on a first install)."""
    to_version: str
    outcome: Outcome
    reason: str
    message: str
    failed_phase: Phase | None
    finished_at: UtcDatetime


class ModelTotals(FleetRecord):
    """Cumulative counters of one model version on one device, and its latest latencies."""

    model_namespace: DnsLabel
    model_name: DnsName
    version: Version
    windows: Count
    inference_count: Count
    error_count: Count
    accelerator_fallback_count: Count
    last_p50_ms: Millis
    last_p95_ms: Millis
    last_p99_ms: Millis


class DeviceHealthRecord(FleetRecord):
    """Per-device health: what the aggregates of every gateway replica are computed from."""

    device_id: str
    namespace: DnsLabel
    name: DnsLabel
    device_class: DnsName
    updated_at: UtcDatetime
    last_window: HealthWindow | None
    totals: dict[str, ModelTotals]
    """Keyed by :func:`totals_key`."""
    last_install: InstallRecord | None
    journal_seq: int = Field(default=0, ge=0)
    """Sequence number of the last journaled report these counts include (the writing replica's
    health journal; 0 without one): a restarted replica replays only the reports after it."""
    journal_id: str = Field(default="", max_length=64)
    """Which journal ``journal_seq`` counts in: a journal folder lost and made anew (a rescheduled
    pod) numbers from 1 again, and the old numbers must not hide its reports."""

    @model_validator(mode="after")
    def _consistent_keys(self) -> Self:
        if self.device_id != device_id(self.namespace, self.name):
            raise ValueError(f"device_id {self.device_id!r} is not {device_id(self.namespace, self.name)!r}")
        for key, totals in self.totals.items():
            if key != totals_key(totals.model_namespace, totals.model_name, totals.version):
                raise ValueError(f"totals under {key!r} are for another model version")
        return self


class ReplicaHealth(FleetRecord):
    """The health of every device of one class that one gateway replica served: one shard of the store.

    Each record's totals count only what this replica received, so shards from several replicas add
    up to a device's whole (a device that moves between replicas is counted once per report).
    """

    replica_id: Annotated[str, StringConstraints(pattern=REPLICA_ID_PATTERN)]
    device_class: DnsName
    updated_at: UtcDatetime
    devices: dict[str, DeviceHealthRecord]
    """Keyed by device id."""

    @model_validator(mode="after")
    def _devices_of_this_class(self) -> Self:
        for key, record in self.devices.items():
            if key != record.device_id:
                raise ValueError(f"health under {key!r} is of device {record.device_id!r}")
            if record.device_class != self.device_class:
                raise ValueError(f"device {key!r} is of class {record.device_class!r}, not {self.device_class!r}")
        return self


class HealthAggregate(FleetRecord):
    """One model version on one device class, across every device reporting it."""

    model_namespace: str
    model_name: str
    device_class: str
    version: str
    devices_reporting: int
    """Devices whose health record carries totals for this version."""
    inference_count: int
    error_count: int
    error_rate: float
    """``error_count / inference_count``; 0 when nothing was served."""
    p95_ms_max: float
    """Highest latest-window p95 among devices that served this version."""
    p95_ms_median: float
    accelerator_fallback_count: int
    installs_succeeded: int
    """Devices whose latest install report for this version succeeded (likewise the next three)."""
    installs_failed: int
    installs_rolled_back: int
    installs_refused: int
    devices_healthy: int = 0
    """Reporting devices whose own error rate for this version is at most the threshold given."""
    healthy_ratio: float = 0.0
    """``devices_healthy / devices_reporting``; 0 when none report."""
