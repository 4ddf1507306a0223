"""The gateway's device-facing operations, free of any transport: enrollment, identity, artifacts, health.

The gRPC servicer translates messages into the inputs below and calls these methods; everything
refused here is a :class:`~edgefleet_operator.gateway.errors.GatewayError` the interceptor maps to a
status code. The gateway keeps no state another replica needs: enrollments, installs and (at a
bounded rate) health go to :class:`~edgefleet_operator.fleet.FleetState` in the artifact store.

Two hot paths stay free of store writes and JSON parsing per call, because a gateway takes
thousands of them a second: authentication (device records cached per certificate serial for
:attr:`ServicePolicy.identity_cache_ttl`, so a revocation bites within that time) and health intake
(kept in memory; every ``status_interval`` :meth:`GatewayService.flush_health` writes one shard per
device class holding the totals this replica received, and readers add the replicas' shards up).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import JsonValue, ValidationError

from edgefleet_core.bundle.manifest import VERSION_PATTERN
from edgefleet_core.errors import StoreError, StoreLimitExceeded, StoreNotFound
from edgefleet_core.resources.base import DNS_SUBDOMAIN_PATTERN
from edgefleet_core.signing.layout import METADATA_DIR, TARGETS_DIR, is_safe_path
from edgefleet_core.store.base import MAX_KEY_LENGTH, ArtifactStore
from edgefleet_operator.fleet.errors import FleetError, FleetRecordError, TokenRefused
from edgefleet_operator.fleet.records import (
    DNS_LABEL_PATTERN,
    BootstrapToken,
    DeviceHealthRecord,
    DeviceRecord,
    HealthWindow,
    InstallRecord,
    ModelTotals,
    ModelWindow,
    Outcome,
    Phase,
    Slot,
    device_id,
    totals_key,
)
from edgefleet_operator.fleet.state import TOKEN_RETRY_GRACE, FleetState
from edgefleet_operator.gateway.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from edgefleet_operator.gateway.hub import InstalledModel
from edgefleet_operator.gateway.journal import HealthJournal, JournalEntry, decode_times
from edgefleet_operator.gateway.pki import CsrRefused, DeviceIdentity, FleetCA, IssuedCertificate

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 1024 * 1024
"""Largest ``Chunk.data`` (fleet.proto): far below gRPC's default 4 MiB message cap."""
READ_BYTES: Final = 4 * CHUNK_BYTES
"""Bytes read from the store at once while streaming a file (fewer requests to S3), sent as chunks."""
MAX_CSR_BYTES: Final = 8 * 1024
MAX_TOKEN_CHARS: Final = 256
MAX_ROLE_CHARS: Final = 255
MAX_TARGET_PATH_CHARS: Final = 1024
MAX_LABELS: Final = 64
MAX_LIST_ITEMS: Final = 64
MAX_VERSIONS_PER_MODEL: Final = 8
"""Versions of one model whose health totals a replica keeps per device (the most recently reported)."""
MAX_CPU_FEATURES: Final = 1024
"""/proc/cpuinfo lists 100-250 flags on today's x86 and Arm server CPUs; the cap only stops abuse."""
MAX_MODELS_PER_REPORT: Final = 64
MAX_WINDOW: Final = timedelta(days=1)
SIGNED_LIMIT: Final = 1 << 63
"""uint64 values at or above this are negative numbers sent through a signed type: refused as such."""
MAX_AUTH_CACHE: Final = 200_000
ACCELERATOR_TYPES: Final = frozenset({"gpu", "npu", "vpu", "dsp", "tpu"})

_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_ROLE = re.compile(r"^[A-Za-z0-9._-]+$")
_FACT = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_CPU_FEATURE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_AGENT_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Accelerator:
    """One accelerator a device found (fleet.proto ``Accelerator``)."""

    type: str
    model: str
    memory_bytes: int
    execution_providers: tuple[str, ...]


@dataclass(frozen=True)
class HardwareFacts:
    """What a device measured about itself at start-up (fleet.proto ``HardwareFacts``)."""

    cpu_arch: str
    cpu_cores: int
    cpu_features: tuple[str, ...]
    memory_bytes: int
    accelerators: tuple[Accelerator, ...]
    execution_providers: tuple[str, ...]
    storage_free_bytes: int


@dataclass(frozen=True)
class EnrollApplication:
    """An Enroll request as the service takes it."""

    bootstrap_token: str
    csr_pem: str
    device_name: str
    labels: Mapping[str, str]
    hardware: HardwareFacts | None
    agent_version: str


@dataclass(frozen=True)
class GatewayHints:
    """How the gateway asks agents to pace themselves."""

    heartbeat_interval: timedelta
    reconnect_backoff_initial: timedelta
    reconnect_backoff_max: timedelta


@dataclass(frozen=True)
class EnrollResult:
    """What an enrolled device is told: its certificate, whom to trust, who it now is."""

    certificate_chain_pem: bytes
    ca_bundle_pem: bytes
    device_id: str
    namespace: str
    device_class: str
    name: str
    not_after: datetime
    hints: GatewayHints


@dataclass(frozen=True)
class FileChunk:
    """One piece of a metadata or target file (fleet.proto ``Chunk``)."""

    offset: int
    data: bytes
    total_length: int
    eof: bool


@dataclass(frozen=True)
class ModelSample:
    """One model's figures in a health report (fleet.proto ``ModelHealth``)."""

    model_namespace: str
    model_name: str
    version: str
    slot: Slot | None
    inference_count: int
    error_count: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    accelerator_fallback_count: int


@dataclass(frozen=True)
class HealthSample:
    """One health report (fleet.proto ``HealthReport``)."""

    window_start: datetime
    window: timedelta
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    models: tuple[ModelSample, ...]
    energy_joules: float | None


@dataclass(frozen=True)
class InstallOutcomeReport:
    """One install report (fleet.proto ``InstallReport``); ``finished_at`` ``None`` when the device left it unset."""

    assignment_revision: int
    model_namespace: str
    model_name: str
    from_version: str
    to_version: str
    outcome: Outcome
    reason: str
    message: str
    failed_phase: Phase | None
    finished_at: datetime | None


@dataclass(frozen=True)
class ServicePolicy:
    """The service's settings (built once from the gateway's configuration)."""

    certificate_validity: timedelta = timedelta(days=30)
    """Lifetime of the device certificates Enroll issues."""
    heartbeat_interval: timedelta = timedelta(seconds=30)
    """How often agents are asked to report health (never under 1 s)."""
    reconnect_backoff_initial: timedelta = timedelta(seconds=1)
    """First delay of an agent's reconnect backoff."""
    reconnect_backoff_max: timedelta = timedelta(seconds=60)
    """Largest delay of an agent's reconnect backoff."""
    status_interval: timedelta = timedelta(seconds=10)
    """Health records are written at most this often per device."""
    renewal_grace: timedelta = timedelta(hours=24)
    """How long the certificate a renewal replaced is still accepted (a lost Renew response must
    not lock the device out); revocation ends it at once."""
    identity_cache_ttl: timedelta = timedelta(seconds=30)
    """How long a device record read for authentication is trusted: a revocation (or a certificate
    superseded on another replica) bites within this time. Longer means fewer store reads per call."""
    replica_id: str | None = None
    """Names this replica's health shards; ``None`` picks a random one per service instance, so two
    processes (or a restart) never overwrite each other's counts."""
    tuf_prefix: str = "tuf/"
    """Store prefix of the TUF repository whose metadata and targets are served."""


# ------------------------------------------------------------------------------------ validation


def _require(ok: bool, field_name: str, problem: str) -> None:
    if not ok:
        raise InvalidArgument(field_name, problem)


def _check_text(value: str, field_name: str, *, max_chars: int, pattern: re.Pattern[str] | None = None,
                required: bool = True, what: str = "") -> None:  # fmt: skip
    if not value:
        _require(not required, field_name, "is required")
        return
    _require(len(value) <= max_chars, field_name, f"is {len(value)} characters, over {max_chars}")
    if pattern is not None:
        _require(bool(pattern.fullmatch(value)), field_name, f"{value!r} is not {what or 'valid'}")


def _check_label_key(key: str, where: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash:
        _require(
            len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(prefix)),
            where,
            f"key prefix {prefix!r} is not a DNS subdomain",
        )
    _require(bool(_LABEL_NAME.fullmatch(name)), where, f"key {key!r} is not a Kubernetes label key")


def _check_labels(labels: Mapping[str, str]) -> None:
    _require(len(labels) <= MAX_LABELS, "labels", f"{len(labels)} labels, over {MAX_LABELS}")
    for key, value in labels.items():
        where = f"labels[{key[:80]!r}]"
        _check_label_key(key, where)
        _require(
            value == "" or bool(_LABEL_NAME.fullmatch(value)), where, "value is not a Kubernetes label value (≤ 63)"
        )


def _check_names(
    values: tuple[str, ...], field_name: str, pattern: re.Pattern[str], *, max_items: int = MAX_LIST_ITEMS
) -> None:
    _require(len(values) <= max_items, field_name, f"{len(values)} items, over {max_items}")
    for index, value in enumerate(values):
        _require(bool(pattern.fullmatch(value)), f"{field_name}[{index}]", f"{value[:80]!r} is not valid")


def _check_hardware(hardware: HardwareFacts) -> None:
    _check_text(hardware.cpu_arch, "hardware.cpu_arch", max_chars=64, pattern=_FACT, required=False)
    _require(1 <= hardware.cpu_cores <= 1 << 16, "hardware.cpu_cores", f"{hardware.cpu_cores} is not 1 to 65536")
    _check_names(hardware.cpu_features, "hardware.cpu_features", _CPU_FEATURE, max_items=MAX_CPU_FEATURES)
    _check_names(hardware.execution_providers, "hardware.execution_providers", _FACT)
    _require(len(hardware.accelerators) <= 16, "hardware.accelerators", "more than 16 accelerators")
    for index, accelerator in enumerate(hardware.accelerators):
        where = f"hardware.accelerators[{index}]"
        _require(accelerator.type in ACCELERATOR_TYPES, f"{where}.type", f"not one of {sorted(ACCELERATOR_TYPES)}")
        _check_text(accelerator.model, f"{where}.model", max_chars=256, required=False)
        _require(accelerator.model.isprintable(), f"{where}.model", "has control characters")
        _check_names(accelerator.execution_providers, f"{where}.execution_providers", _FACT)


def _check_csr(csr_pem: str) -> None:
    _check_text(csr_pem, "csr_pem", max_chars=MAX_CSR_BYTES)
    _require(len(csr_pem.encode()) <= MAX_CSR_BYTES, "csr_pem", f"over {MAX_CSR_BYTES} bytes")


def _hardware_document(hardware: HardwareFacts | None) -> dict[str, JsonValue]:
    if hardware is None:
        return {}
    return {
        "cpu_arch": hardware.cpu_arch,
        "cpu_cores": hardware.cpu_cores,
        # Sorted and unique is what fleet.proto asks of agents; normalised rather than refused.
        "cpu_features": list[JsonValue](sorted(set(hardware.cpu_features))),
        "memory_bytes": hardware.memory_bytes,
        "accelerators": [
            {
                "type": a.type,
                "model": a.model,
                "memory_bytes": a.memory_bytes,
                "execution_providers": list[JsonValue](a.execution_providers),
            }
            for a in hardware.accelerators
        ],
        "execution_providers": list[JsonValue](hardware.execution_providers),
        "storage_free_bytes": hardware.storage_free_bytes,
    }


def _check_fetch_window(offset: int, max_length: int) -> None:
    _require(offset < SIGNED_LIMIT, "offset", "is negative (sent through a signed type)")
    _require(max_length > 0, "max_length", "is required (> 0)")


def _check_finite(value: float, field_name: str, *, upper: float | None = None) -> None:
    _require(math.isfinite(value) and value >= 0, field_name, f"{value} is not a finite number ≥ 0")
    if upper is not None:
        _require(value <= upper, field_name, f"{value} is over {upper}")


def _check_model_sample(sample: ModelSample, where: str) -> None:
    _check_text(sample.model_namespace, f"{where}.model_namespace", max_chars=63, pattern=_DNS_LABEL,
                what="a DNS-1123 label")  # fmt: skip
    _check_text(sample.model_name, f"{where}.model_name", max_chars=253, pattern=_DNS_SUBDOMAIN,
                what="a DNS-1123 subdomain")  # fmt: skip
    _check_text(sample.version, f"{where}.version", max_chars=64, pattern=_VERSION, what="a bundle version")
    _require(sample.error_count <= sample.inference_count, f"{where}.error_count", "is greater than inference_count")
    _require(
        sample.accelerator_fallback_count <= sample.inference_count,
        f"{where}.accelerator_fallback_count",
        "is greater than inference_count",
    )
    for name, value in (("p50", sample.latency_p50_ms), ("p95", sample.latency_p95_ms),
                        ("p99", sample.latency_p99_ms)):  # fmt: skip
        _check_finite(value, f"{where}.latency_{name}_ms")
    _require(
        sample.latency_p50_ms <= sample.latency_p95_ms <= sample.latency_p99_ms,
        f"{where}.latency_p95_ms",
        "percentiles must satisfy p50 <= p95 <= p99",
    )


def _check_health(sample: HealthSample) -> None:
    _require(timedelta(0) < sample.window <= MAX_WINDOW, "window", f"must be over 0 and at most {MAX_WINDOW}")
    _check_finite(sample.cpu_percent, "cpu_percent", upper=100.0)
    _require(sample.memory_used_bytes <= sample.memory_total_bytes, "memory_used_bytes", "is over memory_total_bytes")
    _require(sample.disk_used_bytes <= sample.disk_total_bytes, "disk_used_bytes", "is over disk_total_bytes")
    if sample.energy_joules is not None:
        _check_finite(sample.energy_joules, "energy_joules")
    _require(
        len(sample.models) <= MAX_MODELS_PER_REPORT, "models", f"{len(sample.models)} over {MAX_MODELS_PER_REPORT}"
    )
    seen: set[tuple[str, str]] = set()
    for index, model in enumerate(sample.models):
        _check_model_sample(model, f"models[{index}]")
        key = (model.model_namespace, model.model_name)
        _require(key not in seen, f"models[{index}]", f"{key[0]}/{key[1]} is reported twice")
        seen.add(key)


def _check_install(report: InstallOutcomeReport) -> None:
    _require(1 <= report.assignment_revision < SIGNED_LIMIT, "assignment_revision", "must be a revision ≥ 1")
    _check_text(report.model_namespace, "model_namespace", max_chars=63, pattern=_DNS_LABEL, what="a DNS-1123 label")
    _check_text(report.model_name, "model_name", max_chars=253, pattern=_DNS_SUBDOMAIN, what="a DNS-1123 subdomain")
    _check_text(report.from_version, "from_version", max_chars=64, pattern=_VERSION, required=False,
                what="a bundle version")  # fmt: skip
    _check_text(report.to_version, "to_version", max_chars=64, pattern=_VERSION, required=False,
                what="a bundle version")  # fmt: skip
    _check_text(report.reason, "reason", max_chars=64, pattern=_REASON, what="an UpperCamelCase reason")
    _check_text(report.message, "message", max_chars=1024, required=False)
    _require(
        (report.failed_phase is None) == (report.outcome == "succeeded"),
        "failed_phase",
        "must be set exactly when the outcome is not SUCCEEDED",
    )


# ------------------------------------------------------------------------------- health intake


@dataclass
class _Totals:
    """Cumulative counters of one model version on one device (mutable twin of ``ModelTotals``)."""

    model_namespace: str
    model_name: str
    version: str
    windows: int = 0
    inference_count: int = 0
    error_count: int = 0
    accelerator_fallback_count: int = 0
    last_p50_ms: float = 0.0
    last_p95_ms: float = 0.0
    last_p99_ms: float = 0.0

    def frozen(self) -> ModelTotals:
        return ModelTotals(
            model_namespace=self.model_namespace,
            model_name=self.model_name,
            version=self.version,
            windows=self.windows,
            inference_count=self.inference_count,
            error_count=self.error_count,
            accelerator_fallback_count=self.accelerator_fallback_count,
            last_p50_ms=self.last_p50_ms,
            last_p95_ms=self.last_p95_ms,
            last_p99_ms=self.last_p99_ms,
        )


@dataclass
class _DeviceHealth:
    """What this replica received from one device since it started: its own counts, never merged.

    Every replica writes only the totals it received, in a shard of its own; readers add the
    shards up. A device that moves between replicas is thus counted once per report, never twice.
    """

    identity: DeviceIdentity
    updated_at: datetime
    last: HealthSample | None = None
    totals: dict[str, _Totals] = field(default_factory=dict)
    last_install: InstallRecord | None = None
    version: int = 1
    """Bumped on every change; the flush compares it with ``written`` to know what is new."""
    written: int = 0
    built: DeviceHealthRecord | None = None
    """The record as of ``version``, kept so an unchanged device costs nothing to write again."""
    resumed_window: HealthWindow | None = None
    """The window of the shard this replica resumed (same replica id), until a newer report comes."""
    journal_seq: int = 0
    """Sequence number of the last journaled report these counts include (0: none)."""
    journal_id: str = ""
    """The journal ``journal_seq`` numbers in (see ``DeviceHealthRecord.journal_id``)."""

    def resume(self, stored: DeviceHealthRecord) -> None:
        """Add this replica's own counts from before a restart (its shard under the same id)."""
        for key, old in stored.totals.items():
            totals = self.totals.get(key)
            if totals is None:
                self.totals[key] = _Totals(**old.model_dump())
                continue
            totals.windows += old.windows
            totals.inference_count += old.inference_count
            totals.error_count += old.error_count
            totals.accelerator_fallback_count += old.accelerator_fallback_count
        self.last_install = self.last_install or stored.last_install
        self.resumed_window = stored.last_window
        if stored.journal_id == self.journal_id:  # numbers of another (lost) journal say nothing of this one
            self.journal_seq = max(self.journal_seq, stored.journal_seq)
        self.built = None

    def last_window_start(self) -> datetime | None:
        """Start of the newest window counted (this process's, or the resumed shard's)."""
        if self.last is not None:
            return self.last.window_start
        return self.resumed_window.window_start if self.resumed_window is not None else None

    def changed(self, now: datetime) -> None:
        self.updated_at = now
        self.version += 1
        self.built = None

    def add(self, sample: HealthSample, now: datetime) -> None:
        self.last = sample
        self.changed(now)
        for model in sample.models:
            key = totals_key(model.model_namespace, model.model_name, model.version)
            totals = self.totals.pop(key, None)  # re-inserted last: the dict stays in order of use
            if totals is None:
                totals = _Totals(model.model_namespace, model.model_name, model.version)
            self.totals[key] = totals
            totals.windows += 1
            totals.inference_count += model.inference_count
            totals.error_count += model.error_count
            totals.accelerator_fallback_count += model.accelerator_fallback_count
            if model.inference_count:  # latencies mean nothing in an idle window (fleet.proto)
                totals.last_p50_ms = model.latency_p50_ms
                totals.last_p95_ms = model.latency_p95_ms
                totals.last_p99_ms = model.latency_p99_ms
        self._forget_old_versions()

    def _forget_old_versions(self) -> None:
        """Keep the totals of the :data:`MAX_VERSIONS_PER_MODEL` versions of each model reported last.

        Rollouts compare a version with its predecessor; without a bound a device that went
        through hundreds of versions would grow this replica's shard until it could not be written.
        """
        seen: dict[tuple[str, str], int] = {}
        for key in reversed(list(self.totals)):  # newest first
            totals = self.totals[key]
            model = (totals.model_namespace, totals.model_name)
            seen[model] = seen.get(model, 0) + 1
            if seen[model] > MAX_VERSIONS_PER_MODEL:
                del self.totals[key]

    def record(self) -> DeviceHealthRecord:
        if self.built is not None:
            return self.built
        window = self.resumed_window
        if self.last is not None:
            sample = self.last
            window = HealthWindow(
                window_start=sample.window_start,
                window_seconds=sample.window.total_seconds(),
                cpu_percent=sample.cpu_percent,
                memory_used_bytes=sample.memory_used_bytes,
                memory_total_bytes=sample.memory_total_bytes,
                disk_used_bytes=sample.disk_used_bytes,
                disk_total_bytes=sample.disk_total_bytes,
                models=[
                    ModelWindow(
                        model_namespace=m.model_namespace,
                        model_name=m.model_name,
                        version=m.version,
                        slot=m.slot,
                        inference_count=m.inference_count,
                        error_count=m.error_count,
                        latency_p50_ms=m.latency_p50_ms,
                        latency_p95_ms=m.latency_p95_ms,
                        latency_p99_ms=m.latency_p99_ms,
                        accelerator_fallback_count=m.accelerator_fallback_count,
                    )
                    for m in sample.models
                ],
                energy_joules=sample.energy_joules,
            )
        identity = self.identity
        self.built = DeviceHealthRecord(
            device_id=identity.device_id,
            namespace=identity.namespace,
            name=identity.name,
            device_class=identity.device_class,
            updated_at=self.updated_at,
            last_window=window,
            totals={key: totals.frozen() for key, totals in self.totals.items()},
            last_install=self.last_install,
            journal_seq=self.journal_seq,
            journal_id=self.journal_id,
        )
        return self.built


# --------------------------------------------------------------------------------------- service


class GatewayService:
    """Enrollment, authentication, artifact reads and health intake for one gateway process.

    Thread-safe where the servicer needs it: the store-touching methods run in worker threads
    while :meth:`report_health` and :meth:`cached_device` run on the event loop.
    """

    def __init__(
        self,
        fleet: FleetState,
        store: ArtifactStore,
        ca: FleetCA,
        policy: ServicePolicy | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        journal: HealthJournal | None = None,
    ) -> None:
        self._fleet = fleet
        self._store = store
        self._ca = ca
        self.policy = policy or ServicePolicy()
        self._clock = clock
        # serial -> (record or the refusal to repeat, when it was read)
        self._auth: dict[str, tuple[DeviceRecord | Unauthenticated, datetime]] = {}
        self.replica_id = self.policy.replica_id or secrets.token_hex(6)
        """Names this replica's health shards (``fleet/health/<class>/replica-<id>.json``)."""
        self._health: dict[str, _DeviceHealth] = {}
        self._vacated: set[str] = set()  # classes whose shard must be rewritten although no entry in it changed
        self._resumed: set[str] = set()  # classes whose earlier shard (same replica id) was folded in
        self._health_lock = threading.Lock()
        self._write_lock = threading.Lock()
        # Enroll and Renew read a token or device record, decide, and write it back: without this,
        # two enrollments running in worker threads at once both see a single-use token unspent
        # and both spend it (or both take one free name). Rare calls: one lock for all is enough.
        # Between replicas, create-only store keys decide (a token use, a new device's record).
        self._enroll_lock = threading.Lock()
        self._revisions: dict[str, int] = {}  # device id -> highest assignment revision read for it
        if journal is not None and self.policy.replica_id is None:
            # A random id is new at every start: a restart could never find its own journal.
            raise ValueError("a health journal needs a configured replica id")
        self._journal = journal
        self._journal_id = journal.journal_id if journal is not None else ""
        """Acknowledged health reports not yet in the store (see gateway/journal.py); opened by
        :meth:`recover_journal`."""

    @property
    def hints(self) -> GatewayHints:
        """What Enroll tells agents about pacing."""
        return GatewayHints(
            heartbeat_interval=max(self.policy.heartbeat_interval, timedelta(seconds=1)),
            reconnect_backoff_initial=self.policy.reconnect_backoff_initial,
            reconnect_backoff_max=self.policy.reconnect_backoff_max,
        )

    # ------------------------------------------------------------------------------- enrollment

    def enroll(self, application: EnrollApplication) -> EnrollResult:
        """Check every field and the CSR, decide whether the name may be (re-)enrolled, spend the token, record.

        Who may take a device name: a token that pins it (the operator's deliberate admission or
        re-admission, even of a revoked device); an unpinned token only for a name never enrolled,
        or for its own grace-period retry (it already spent a use on that name moments ago).
        Anything else would let any token of the namespace take over (or lock out) a device.
        Every refusal comes before the token is spent: a refused attempt costs the token nothing.
        """
        _check_text(application.bootstrap_token, "bootstrap_token", max_chars=MAX_TOKEN_CHARS)
        _check_csr(application.csr_pem)
        _check_text(application.device_name, "device_name", max_chars=63, pattern=_DNS_LABEL,
                    what="a DNS-1123 label (lowercase alphanumerics and '-', 1-63)")  # fmt: skip
        _check_labels(application.labels)
        if application.hardware is not None:
            _check_hardware(application.hardware)
        _check_text(application.agent_version, "agent_version", max_chars=64, pattern=_AGENT_VERSION,
                    required=False, what="a PEP 440 version")  # fmt: skip
        try:  # unknown and wrong tokens are refused before the lock: a flood of them queues for nothing
            self._fleet.check_token(application.bootstrap_token)
        except TokenRefused as e:
            raise Unauthenticated(f"bootstrap token refused ({e.reason}): {e}") from e
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot check the bootstrap token: {e}") from e
        with self._enroll_lock:
            return self._enroll_checked(application)

    def _enroll_checked(self, application: EnrollApplication) -> EnrollResult:
        """:meth:`enroll` once every field is checked, the enrollment lock held."""
        try:
            token = self._fleet.check_token(application.bootstrap_token)
            name = token.device_name or application.device_name  # a pinned name wins (fleet.proto)
            identity_id = device_id(token.namespace, name)
            existing = self._fleet.get_device(token.namespace, name)
            key_sha256 = _key_fingerprint(application.csr_pem)
            self._check_admission(token, name, existing, key_sha256)
            # Signed before the token is spent, so a CSR that is refused (wrong key type, bad
            # signature, too large) leaves the token as it was; an unused certificate is harmless,
            # as only the serial recorded below is ever accepted.
            issued = self._sign(application.csr_pem, token.namespace, token.device_class, name)
            token = self._fleet.redeem_token(application.bootstrap_token, name, identity_id)
        except TokenRefused as e:
            logger.info("enrollment of %r refused: bootstrap token %s", application.device_name, e.reason)
            raise Unauthenticated(f"bootstrap token refused ({e.reason}): {e}") from e
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot check the bootstrap token: {e}") from e
        now = self._clock()
        try:
            record = DeviceRecord(
                device_id=identity_id,
                namespace=token.namespace,
                name=name,
                device_class=token.device_class,
                labels=dict(application.labels),
                hardware=_hardware_document(application.hardware),
                agent_version=application.agent_version,
                cert_serial=issued.serial,
                cert_not_after=issued.not_after,
                key_sha256=key_sha256,
                enrolled_at=now,
            )
        except ValidationError as e:  # every field was checked above: a disagreement with the record is ours
            raise InvalidArgument("device", f"cannot be recorded: {e.errors()[0]['msg']}") from e
        try:
            if existing is not None:
                self._fleet.put_device(record)
            elif not self._fleet.create_device(record):
                # Someone recorded this name since it was read. This device itself (same key: an
                # attempt whose answer was lost, or a store create retried after it landed) takes its
                # record over; another replica's enrollment is never replaced.
                raced = self._fleet.get_device(token.namespace, name)
                if raced is None or raced.key_sha256 != key_sha256:
                    raise PermissionDenied(f"device {token.namespace}/{name} was enrolled by a concurrent enrollment")
                self._fleet.put_device(record)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot record the device: {e}") from e
        self._remember(record)
        if existing is not None and existing.cert_serial != record.cert_serial:
            self._supersede(existing.cert_serial)
        logger.info("[%s/%s] enrolled (class %s, serial %s)", token.namespace, name, token.device_class, issued.serial)
        return self._result(record, issued)

    def _check_admission(
        self, token: BootstrapToken, name: str, existing: DeviceRecord | None, key_sha256: str
    ) -> None:
        """Refuse a token that may not (re-)enroll ``name`` (see :meth:`enroll`)."""
        if existing is None or token.device_name is not None:
            return
        where = f"{token.namespace}/{name}"
        if existing.revoked:
            raise PermissionDenied(
                f"device {where} is revoked; re-admitting it takes a token pinned to its name (--device-name)"
            )
        now = self._clock()
        # A retry after a lost response comes from the same device, so with the same key (the agent
        # keeps its key across attempts); another holder of a batch token asking for this name
        # within the grace would otherwise take the identity over.
        retry = existing.key_sha256 == key_sha256 and any(
            use.device_name == name and timedelta(0) <= now - use.used_at <= TOKEN_RETRY_GRACE for use in token.used_by
        )
        if not retry:
            logger.warning("[%s] enrollment refused: already enrolled, token %s is not pinned to it", where,
                           token.token_id)  # fmt: skip
            raise PermissionDenied(
                f"device {where} is already enrolled; replacing its enrollment takes a token pinned to its name"
            )

    def _sign(self, csr_pem: str, namespace: str, device_class: str, name: str) -> IssuedCertificate:
        try:
            return self._ca.sign_device_csr(
                csr_pem.encode(),
                namespace=namespace,
                device_class=device_class,
                name=name,
                validity=self.policy.certificate_validity,
            )
        except CsrRefused as e:
            raise InvalidArgument("csr_pem", str(e)) from e

    def _result(self, record: DeviceRecord, issued: IssuedCertificate) -> EnrollResult:
        return EnrollResult(
            certificate_chain_pem=issued.certificate_pem,
            ca_bundle_pem=self._ca.certificate_pem,
            device_id=record.device_id,
            namespace=record.namespace,
            device_class=record.device_class,
            name=record.name,
            not_after=issued.not_after,
            hints=self.hints,
        )

    def renew(self, identity: DeviceIdentity, csr_pem: str) -> EnrollResult:
        """A new certificate for the calling device's new key: same identity, class and name.

        The device record is read afresh (never from the cache): only the current, unrevoked
        enrollment may renew. The new serial replaces the old one in the record, so the old
        certificate is refused at once here and within the identity cache time on other replicas.
        """
        _check_csr(csr_pem)
        with self._enroll_lock:
            return self._renew_checked(identity, csr_pem)

    def _renew_checked(self, identity: DeviceIdentity, csr_pem: str) -> EnrollResult:
        """:meth:`renew` once the CSR is checked, the enrollment lock held."""
        try:
            record = self._fleet.get_device(identity.namespace, identity.name)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot look up device {identity.device_id}: {e}") from e
        now = self._clock()
        if (
            record is None
            or not record.accepts(identity.serial, now, self.policy.renewal_grace)
            or record.device_class != identity.device_class
        ):
            raise Unauthenticated("unknown certificate: not the current enrollment of this device")
        if record.revoked:
            raise PermissionDenied(f"device {identity.device_id} is revoked")
        issued = self._sign(csr_pem, record.namespace, record.device_class, record.name)
        # Renewing from the current certificate keeps it as the previous one for the grace period;
        # renewing again from the previous one (the first response was lost) replaces the unused new one.
        from_current = identity.serial == record.cert_serial
        previous = record.cert_serial if from_current else record.previous_cert_serial
        renewed = record.model_copy(
            update={
                "cert_serial": issued.serial,
                "cert_not_after": issued.not_after,
                "key_sha256": _key_fingerprint(csr_pem),
                "previous_cert_serial": previous,
                # Renewing again from the previous certificate does not restart its grace: the
                # replaced key stops working at most one grace after the first renewal.
                "renewed_at": now if from_current else record.renewed_at,
            }
        )
        try:
            self._fleet.put_device(renewed)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot record the renewed certificate: {e}") from e
        self._remember(renewed)
        if identity.serial != record.cert_serial:
            # Renewed again from the previous certificate: the one the lost response carried was
            # never used and is refused from now on.
            self._supersede(record.cert_serial)
        logger.info("[%s/%s] renewed (serial %s -> %s)", record.namespace, record.name, identity.serial, issued.serial)
        return self._result(renewed, issued)

    def _supersede(self, serial: str) -> None:
        """Refuse a serial this replica just replaced at once, instead of after the cache time."""
        self._auth[serial] = (Unauthenticated("unknown certificate: not the current enrollment of this device"),
                              self._clock())  # fmt: skip

    def _remember(self, record: DeviceRecord) -> None:
        """Cache a record this replica just wrote, so the new certificate's first call needs no read."""
        if len(self._auth) >= MAX_AUTH_CACHE:
            self._auth.clear()
        self._auth[record.cert_serial] = (record, self._clock())

    # ---------------------------------------------------------------------------- authentication

    def cached_device(self, identity: DeviceIdentity) -> DeviceRecord | None:
        """The device's record if a fresh cached read decides the call (no IO); ``None`` to read it.

        Raises what :meth:`authenticate` would for a cached refusal.
        """
        cached = self._auth.get(identity.serial)
        if cached is None or self._clock() - cached[1] >= self.policy.identity_cache_ttl:
            return None
        return self._judge(identity, cached[0])

    def authenticate(self, identity: DeviceIdentity) -> DeviceRecord:
        """The device record of a verified certificate; refused if it is not the device's current one or revoked."""
        cached = self.cached_device(identity)
        if cached is not None:
            return cached
        try:
            record = self._fleet.get_device(identity.namespace, identity.name)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot look up device {identity.device_id}: {e}") from e
        verdict: DeviceRecord | Unauthenticated = (
            record
            if record is not None
            and record.accepts(identity.serial, self._clock(), self.policy.renewal_grace)
            and record.device_class == identity.device_class
            else Unauthenticated("unknown certificate: not the current enrollment of this device")
        )
        if len(self._auth) >= MAX_AUTH_CACHE:
            self._auth.clear()  # rare: a serial is re-read at worst
        self._auth[identity.serial] = (verdict, self._clock())
        return self._judge(identity, verdict)

    def _judge(self, identity: DeviceIdentity, verdict: DeviceRecord | Unauthenticated) -> DeviceRecord:
        if isinstance(verdict, Unauthenticated):
            raise Unauthenticated(str(verdict))
        if not verdict.accepts(identity.serial, self._clock(), self.policy.renewal_grace) or (
            verdict.device_class,
            verdict.namespace,
            verdict.name,
        ) != (identity.device_class, identity.namespace, identity.name):
            raise Unauthenticated("unknown certificate: not the current enrollment of this device")
        if verdict.revoked:
            raise PermissionDenied(f"device {identity.device_id} is revoked")
        return verdict

    # --------------------------------------------------------------------------------- artifacts

    def open_metadata(self, role: str, version: int, offset: int, max_length: int) -> Iterator[FileChunk]:
        """The chunks of ``<role>.json`` (version 0) or ``<version>.<role>.json`` from ``offset``.

        Every refusal is raised here, before the first chunk; the iterator itself only fails if
        the store does mid-read (:class:`Unavailable`: the client resumes from its offset).
        """
        _check_text(role, "role", max_chars=MAX_ROLE_CHARS, pattern=_ROLE, what="a TUF role name")
        _require(role not in (".", ".."), "role", f"{role!r} is not a TUF role name")
        _require(version < SIGNED_LIMIT, "version", "is negative (sent through a signed type)")
        _check_fetch_window(offset, max_length)
        filename = f"{role}.json" if version == 0 else f"{version}.{role}.json"
        return self._open(f"{self.policy.tuf_prefix}{METADATA_DIR}{filename}", f"metadata {filename}", offset,
                          max_length)  # fmt: skip

    def open_target(
        self, identity: DeviceIdentity, target_path: str, offset: int, max_length: int
    ) -> Iterator[FileChunk]:
        """The chunks of a TUF target of the device's own class from ``offset`` (as :meth:`open_metadata`)."""
        _check_text(target_path, "target_path", max_chars=MAX_TARGET_PATH_CHARS)
        _require(".." not in target_path.split("/"), "target_path", "must not have '..' segments")
        _require(is_safe_path(target_path), "target_path", "is not a relative path of [A-Za-z0-9._-] segments")
        _check_fetch_window(offset, max_length)
        if not target_path.startswith(f"{identity.device_class}/"):
            # The wording (PERMISSION_DENIED) wins over fleet.proto's NOT_FOUND here.
            raise PermissionDenied(f"target {target_path} is not published for device class {identity.device_class}")
        return self._open(f"{self.policy.tuf_prefix}{TARGETS_DIR}{target_path}", f"target {target_path}", offset,
                          max_length)  # fmt: skip

    def _open(self, key: str, what: str, offset: int, max_length: int) -> Iterator[FileChunk]:
        if len(key) > MAX_KEY_LENGTH:  # a valid path, but longer than any key the store can hold
            raise NotFound(f"no {what}")
        try:
            found = self._store.stat(key)
        except StoreError as e:
            raise Unavailable(f"cannot read {what}: {e}") from e
        if found is None:
            raise NotFound(f"no {what}")
        if found.size > max_length:
            raise ResourceExhausted(f"{what} is {found.size} bytes, over max_length {max_length}")
        if offset > found.size:
            raise OutOfRange(f"offset {offset} is beyond the end of {what} ({found.size} bytes)")
        if offset == 0 and found.size <= CHUNK_BYTES:
            # Read whole in one call: a small mutable file (timestamp.json) replaced between stat and
            # read must not come out as a mix of two versions.
            try:
                data = self._store.get(key, max_bytes=min(max_length, CHUNK_BYTES))
            except StoreNotFound as e:
                raise NotFound(f"no {what}") from e
            except StoreLimitExceeded as e:
                raise ResourceExhausted(f"{what} grew over max_length {max_length} while read") from e
            except StoreError as e:
                raise Unavailable(f"cannot read {what}: {e}") from e
            return iter((FileChunk(0, data, len(data), True),))
        return self._chunks(key, what, offset, found.size)

    def _chunks(self, key: str, what: str, offset: int, total: int) -> Iterator[FileChunk]:
        if offset == total:
            yield FileChunk(offset, b"", total, True)
            return
        position = offset
        while position < total:
            want = min(READ_BYTES, total - position)
            try:
                data = self._store.get_range(key, position, want)
            except StoreError as e:
                raise Unavailable(f"cannot read {what} at {position}: {e}") from e
            if len(data) != want:
                raise Unavailable(f"{what} changed while it was read; fetch it again")
            view = memoryview(data)
            for start in range(0, want, CHUNK_BYTES):
                piece = bytes(view[start : start + CHUNK_BYTES])
                end = position + start + len(piece)
                yield FileChunk(position + start, piece, total, end == total)
            position += want

    # ------------------------------------------------------------------------------------ health

    def report_health(self, identity: DeviceIdentity, sample: HealthSample) -> None:
        """Validate a report and add it to this replica's counts; :meth:`flush_health` writes them later."""
        _check_health(sample)
        now = self._clock()
        with self._health_lock:
            known = self._health.get(identity.device_id)
            if (
                known is not None
                and known.identity.device_class == identity.device_class
                and known.last_window_start() == sample.window_start
            ):
                # The agent sends one report at a time and resends it until acknowledged, so a
                # report whose ack was lost comes back as the very window counted last: ack it
                # again, count it once. (Equality, not "not newer": a device clock stepped back
                # must not have its later windows dropped.)
                logger.debug("[%s] health window %s already counted (a resend)", identity.device_id,
                             sample.window_start)  # fmt: skip
                return
            seq = 0
            if self._journal is not None:
                try:  # before the ack: once acknowledged, the agent forgets the window
                    seq = self._journal.append(
                        identity.device_id, identity.namespace, identity.device_class, identity.name, sample
                    )
                except OSError as e:
                    raise Unavailable(f"cannot journal the health report (the agent keeps it): {e}") from e
            entry = self._entry(identity, now)
            entry.add(sample, now)
            entry.journal_seq = max(entry.journal_seq, seq)

    def _entry(self, identity: DeviceIdentity, now: datetime) -> _DeviceHealth:
        """The device's entry (the health lock held); a new one when it was re-admitted into another class."""
        entry = self._health.get(identity.device_id)
        if entry is None or entry.identity.device_class != identity.device_class:
            if entry is not None:
                self._vacated.add(entry.identity.device_class)  # its old class's shard must drop it
            entry = self._health[identity.device_id] = _DeviceHealth(identity, now, journal_id=self._journal_id)
        return entry

    def report_install(self, identity: DeviceIdentity, report: InstallOutcomeReport) -> bool:
        """Keep an install report (written at once); ``False`` for a duplicate.

        The device's health record shows it as ``last_install`` from the next flush on: rewriting
        the whole shard per report would cost a class-wide write per install.
        """
        _check_install(report)
        self._check_revision(identity, report.assignment_revision)
        now = self._clock()
        try:
            record = InstallRecord(
                revision=report.assignment_revision,
                model_namespace=report.model_namespace,
                model_name=report.model_name,
                from_version=report.from_version,
                to_version=report.to_version,
                outcome=report.outcome,
                reason=report.reason,
                message=report.message,
                failed_phase=report.failed_phase,
                finished_at=report.finished_at or now,
            )
        except ValidationError as e:
            raise InvalidArgument("install report", e.errors()[0]["msg"]) from e
        try:
            fresh = self._fleet.record_install(identity.namespace, identity.name, record)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot keep the install report: {e}") from e
        if not fresh:
            return False
        logger.info(
            "[%s/%s] install r%d %s/%s %s: %s (%s)",
            identity.namespace, identity.name, record.revision, record.model_namespace, record.model_name,
            record.to_version, record.outcome, record.reason,
        )  # fmt: skip
        with self._health_lock:
            entry = self._entry(identity, now)
            entry.last_install = record
            entry.changed(now)
        return True

    def _check_revision(self, identity: DeviceIdentity, revision: int) -> None:
        """Refuse a report of a revision never assigned to the device (each one would be a store write).

        The highest revision seen per device only grows, so the store is read again only when a
        report names a revision above it (a new assignment since, or a refusal to come).
        """
        known = self._revisions.get(identity.device_id, 0)
        if revision <= known:
            return
        try:
            latest = self._fleet.latest_revision_for(identity.namespace, identity.name)
        except (FleetError, StoreError) as e:
            raise Unavailable(f"cannot read the assignments of {identity.device_id}: {e}") from e
        if len(self._revisions) >= MAX_AUTH_CACHE:
            self._revisions.clear()
        self._revisions[identity.device_id] = latest
        _require(
            revision <= latest,
            "assignment_revision",
            f"{revision} was never assigned to this device (its latest revision is {latest})",
        )

    def flush_health(self) -> int:
        """Write this replica's shard of each device class with changes since the last flush; how many.

        Called every ``status_interval`` by the server (and on shutdown). A shard holds every device
        this replica has heard from since it started, so entries are never dropped while it lives:
        a shard rewritten without a device would take that device's counts out of the totals.
        """
        with self._write_lock:  # one writer at a time, so an older snapshot never lands last
            with self._health_lock:
                entries = list(self._health.values())
                classes = set(self._vacated)
                self._vacated.clear()
                if self._journal is not None:
                    # Closed segments now hold only reports in this snapshot (appends take this lock).
                    self._journal.rotate()
            self._seal_journal()
            classes.update(e.identity.device_class for e in entries if e.version != e.written)
            try:
                for device_class in sorted(classes - self._resumed):
                    entries.extend(self._resume(device_class))
            except (FleetError, StoreError):
                with self._health_lock:
                    self._vacated.update(classes)  # nothing written: every class is tried again next flush
                raise
            written = 0
            failed: BaseException | None = None
            for device_class in sorted(classes):
                records: list[DeviceHealthRecord] = []
                versions: list[tuple[_DeviceHealth, int]] = []
                for entry in entries:
                    if entry.identity.device_class != device_class:
                        continue
                    # Per entry, so the event loop's report_health never waits for a whole class.
                    with self._health_lock:
                        if self._health.get(entry.identity.device_id) is not entry:
                            continue  # re-admitted into another class meanwhile
                        try:
                            records.append(entry.record())
                        except ValidationError as e:  # one bad entry must not block every flush
                            logger.error("health of %s cannot be recorded; dropped: %s", entry.identity.device_id, e)
                            del self._health[entry.identity.device_id]
                            continue
                        versions.append((entry, entry.version))
                try:
                    self._fleet.write_replica_health(self.replica_id, device_class, records)
                except (FleetError, StoreError) as e:
                    with self._health_lock:
                        self._vacated.add(device_class)  # try this class again next flush
                    failed = failed or e
                    continue
                written += 1
                for entry, version in versions:
                    entry.written = max(entry.written, version)
            if failed is not None:
                raise failed
            self._discard_journaled()
        return written

    def _seal_journal(self) -> None:
        """Sync and close the segment the flush's snapshot closed, without holding up report_health."""
        if self._journal is not None:
            self._journal.seal()

    def _discard_journaled(self) -> None:
        """After a flush that wrote every shard: the closed segments' reports are all in the store."""
        if self._journal is not None:
            self._journal.discard_closed()

    def recover_journal(self) -> int:
        """Open the health journal, first replaying what a killed process left in it; the reports replayed.

        Called once before serving. Per device, only reports after the last one its stored shard
        counts (``journal_seq``) are added, so a crash between a shard write and the segment's
        deletion counts nothing twice. Raises ``StoreError``/``FleetError`` if the shards cannot be
        read (serving without them would double count), ``OSError`` if the journal cannot be read.
        """
        journal = self._journal
        if journal is None:
            return 0
        entries = journal.replay()
        for device_class in sorted({e.device_class for e in entries} - self._resumed):
            self._resume(device_class)
        now = self._clock()
        replayed = 0
        with self._health_lock:
            for item in entries:
                identity = DeviceIdentity(item.device_id, item.namespace, item.device_class, item.name, "")
                entry = self._entry(identity, now)
                if item.seq <= entry.journal_seq:
                    continue  # the stored shard counts it already
                try:
                    sample = _journaled_sample(item)
                except (KeyError, TypeError, ValueError) as e:
                    logger.warning("health journal entry %d unreadable, skipped: %s", item.seq, e)
                    continue
                entry.add(sample, now)
                entry.journal_seq = item.seq
                replayed += 1
            journal.open()
        if entries:
            logger.info("health journal: replayed %d of %d report(s) a previous process acknowledged",
                        replayed, len(entries))  # fmt: skip
        return replayed

    def close_journal(self) -> None:
        """Sync and close the health journal (after the last flush)."""
        if self._journal is not None:
            with self._health_lock:
                self._journal.close()

    def _resume(self, device_class: str) -> list[_DeviceHealth]:
        """Fold in this replica's shard of the class as a previous process left it; the entries it added.

        Only a configured replica id can have one (a random id is new): without this, its first
        flush would replace the counts it wrote before the restart. A store outage raises (nothing
        is written, so nothing is lost); a malformed shard holds nothing to keep and is replaced.
        """
        if self.policy.replica_id is None:
            self._resumed.add(device_class)
            return []
        try:
            stored = self._fleet.read_replica_health(self.replica_id, device_class)
        except FleetRecordError as e:
            logger.warning("own health shard unreadable, replaced with this process's counts: %s", e)
            stored = []
        added: list[_DeviceHealth] = []
        with self._health_lock:
            for record in stored:
                entry = self._health.get(record.device_id)
                if entry is None:
                    identity = DeviceIdentity(record.device_id, record.namespace, device_class, record.name, "")
                    entry = self._health[record.device_id] = _DeviceHealth(
                        identity, record.updated_at, journal_id=self._journal_id
                    )
                    entry.updated_at, entry.written = record.updated_at, entry.version
                    added.append(entry)
                elif entry.identity.device_class != device_class:
                    continue  # re-admitted into another class since: the old class's figures are history
                entry.resume(record)
            self._resumed.add(device_class)
        return added

    def pending_health(self) -> int:
        """Devices whose latest figures are not yet written (for tests and metrics)."""
        with self._health_lock:
            return sum(1 for entry in self._health.values() if entry.version != entry.written)


def _journaled_sample(item: JournalEntry) -> HealthSample:
    """The :class:`HealthSample` a journal entry holds (validated again, as on arrival)."""
    data = item.sample
    window_start, window = decode_times(data)
    sample = HealthSample(
        window_start=window_start,
        window=window,
        cpu_percent=float(data["cpu_percent"]),
        memory_used_bytes=int(data["memory_used_bytes"]),
        memory_total_bytes=int(data["memory_total_bytes"]),
        disk_used_bytes=int(data["disk_used_bytes"]),
        disk_total_bytes=int(data["disk_total_bytes"]),
        models=tuple(ModelSample(**model) for model in data["models"]),
        energy_joules=None if data["energy_joules"] is None else float(data["energy_joules"]),
    )
    try:
        _check_health(sample)
    except InvalidArgument as e:
        raise ValueError(str(e)) from e
    return sample


def _key_fingerprint(csr_pem: str) -> str:
    """sha256 of the CSR's public key (SubjectPublicKeyInfo, DER); INVALID_ARGUMENT if it cannot be read."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        spki = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InvalidArgument("csr_pem", f"not a readable certificate signing request: {e}") from e
    return hashlib.sha256(spki).hexdigest()


def check_watch(last_revision: int, installed: Iterable[InstalledModel]) -> list[InstalledModel]:
    """The fields of a WatchAssignments request, checked; the installed models as a list."""
    _require(last_revision < SIGNED_LIMIT, "last_revision", "is negative (sent through a signed type)")
    models = list(installed)
    _require(len(models) <= MAX_MODELS_PER_REPORT, "installed", f"{len(models)} over {MAX_MODELS_PER_REPORT}")
    for index, model in enumerate(models):
        where = f"installed[{index}]"
        _check_text(model.model_namespace, f"{where}.model_namespace", max_chars=63, pattern=_DNS_LABEL,
                    what="a DNS-1123 label")  # fmt: skip
        _check_text(model.model_name, f"{where}.model_name", max_chars=253, pattern=_DNS_SUBDOMAIN,
                    what="a DNS-1123 subdomain")  # fmt: skip
        _check_text(model.version, f"{where}.version", max_chars=64, pattern=_VERSION, required=False,
                    what="a bundle version")  # fmt: skip
    return models
