"""The FleetGateway servicer: protobuf messages in and out, the device's identity from its certificate.

Thin on purpose: each method translates a request, makes one call into
:class:`~edgefleet_operator.gateway.service.GatewayService` or
:class:`~edgefleet_operator.gateway.hub.AssignmentHub`, and translates the answer. Store IO runs in
worker threads so the event loop keeps serving; errors are left to the interceptor.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from edgefleet_operator.fleet.records import AssignmentRecord, Outcome, Phase, Slot
from edgefleet_operator.gateway.errors import InvalidArgument, Unauthenticated
from edgefleet_operator.gateway.hub import AssignmentHub, InstalledModel, Instruction
from edgefleet_operator.gateway.interceptor import PEER_CERTIFICATE
from edgefleet_operator.gateway.metrics import GatewayMetrics
from edgefleet_operator.gateway.pki import DeviceIdentity, identity_from_certificate
from edgefleet_operator.gateway.service import (
    Accelerator,
    EnrollApplication,
    EnrollResult,
    FileChunk,
    GatewayService,
    HardwareFacts,
    HealthSample,
    InstallOutcomeReport,
    ModelSample,
    check_watch,
)
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

Context = aio.ServicerContext[Any, Any]
MAX_CACHED_IDENTITIES: Final = 100_000
CHUNKS_PER_HOP: Final = 4
"""Chunks (1 MiB each) read per hop to a worker thread while streaming a file: 4 MiB per hop, 1 MiB messages."""

_SLOTS: Final[dict[int, Slot | None]] = {fleet_pb2.SLOT_UNSPECIFIED: None, fleet_pb2.SLOT_A: "a", fleet_pb2.SLOT_B: "b"}
_OUTCOMES: Final[dict[int, Outcome]] = {
    fleet_pb2.INSTALL_OUTCOME_SUCCEEDED: "succeeded",
    fleet_pb2.INSTALL_OUTCOME_FAILED: "failed",
    fleet_pb2.INSTALL_OUTCOME_ROLLED_BACK: "rolled_back",
    fleet_pb2.INSTALL_OUTCOME_REFUSED_VERIFICATION: "refused_verification",
}
_PHASES: Final[dict[int, Phase | None]] = {
    fleet_pb2.INSTALL_PHASE_UNSPECIFIED: None,
    fleet_pb2.INSTALL_PHASE_DOWNLOAD: "download",
    fleet_pb2.INSTALL_PHASE_VERIFY: "verify",
    fleet_pb2.INSTALL_PHASE_DECODE: "decode",
    fleet_pb2.INSTALL_PHASE_ACTIVATE: "activate",
    fleet_pb2.INSTALL_PHASE_SELF_TEST: "self_test",
}
_ACTIONS: Final = {
    "install": fleet_pb2.ASSIGNMENT_ACTION_INSTALL,
    "rollback": fleet_pb2.ASSIGNMENT_ACTION_ROLLBACK,
    "remove": fleet_pb2.ASSIGNMENT_ACTION_REMOVE,
}


# ------------------------------------------------------------------------------- proto → domain


def _timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as e:
        raise InvalidArgument(field, f"is not a valid point in time: {e}") from e


def _duration(value: duration_pb2.Duration, field: str) -> timedelta:
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError) as e:
        raise InvalidArgument(field, f"is not a valid duration: {e}") from e


def _enum(table: dict[int, Any], value: int, field: str) -> Any:
    if value not in table:
        raise InvalidArgument(field, f"{value} is not a known value")
    return table[value]


def enroll_application(request: fleet_pb2.EnrollRequest) -> EnrollApplication:
    hardware = None
    if request.HasField("hardware"):
        facts = request.hardware
        hardware = HardwareFacts(
            cpu_arch=facts.cpu_arch,
            cpu_cores=facts.cpu_cores,
            cpu_features=tuple(facts.cpu_features),
            memory_bytes=facts.memory_bytes,
            accelerators=tuple(
                Accelerator(a.type, a.model, a.memory_bytes, tuple(a.execution_providers)) for a in facts.accelerators
            ),
            execution_providers=tuple(facts.execution_providers),
            storage_free_bytes=facts.storage_free_bytes,
        )
    return EnrollApplication(
        bootstrap_token=request.bootstrap_token,
        csr_pem=request.csr_pem,
        device_name=request.device_name,
        labels=dict(request.labels),
        hardware=hardware,
        agent_version=request.agent_version,
    )


def health_sample(request: fleet_pb2.HealthReport) -> HealthSample:
    if not request.HasField("window_start"):
        raise InvalidArgument("window_start", "is required")
    if not request.HasField("window"):
        raise InvalidArgument("window", "is required")
    return HealthSample(
        window_start=_timestamp(request.window_start, "window_start"),
        window=_duration(request.window, "window"),
        cpu_percent=request.cpu_percent,
        memory_used_bytes=request.memory_used_bytes,
        memory_total_bytes=request.memory_total_bytes,
        disk_used_bytes=request.disk_used_bytes,
        disk_total_bytes=request.disk_total_bytes,
        models=tuple(
            ModelSample(
                model_namespace=m.model_namespace,
                model_name=m.model_name,
                version=m.version,
                slot=_enum(_SLOTS, m.slot, f"models[{i}].slot"),
                inference_count=m.inference_count,
                error_count=m.error_count,
                latency_p50_ms=m.latency_p50_ms,
                latency_p95_ms=m.latency_p95_ms,
                latency_p99_ms=m.latency_p99_ms,
                accelerator_fallback_count=m.accelerator_fallback_count,
            )
            for i, m in enumerate(request.models)
        ),
        energy_joules=request.energy_joules if request.HasField("energy_joules") else None,
    )


def install_report(request: fleet_pb2.InstallReport) -> InstallOutcomeReport:
    if request.outcome == fleet_pb2.INSTALL_OUTCOME_UNSPECIFIED:
        raise InvalidArgument("outcome", "is required")
    return InstallOutcomeReport(
        assignment_revision=request.assignment_revision,
        model_namespace=request.model_namespace,
        model_name=request.model_name,
        from_version=request.from_version,
        to_version=request.to_version,
        outcome=_enum(_OUTCOMES, request.outcome, "outcome"),
        reason=request.reason,
        message=request.message,
        failed_phase=_enum(_PHASES, request.failed_phase, "failed_phase"),
        finished_at=_timestamp(request.finished_at, "finished_at") if request.HasField("finished_at") else None,
    )


# ------------------------------------------------------------------------------- domain → proto


def assignment_message(instruction: Instruction) -> fleet_pb2.Assignment:
    if not isinstance(instruction, AssignmentRecord):
        return fleet_pb2.Assignment(
            revision=instruction.revision,
            model_namespace=instruction.model_namespace,
            model_name=instruction.model_name,
            action=fleet_pb2.ASSIGNMENT_ACTION_REMOVE,
        )
    remove = instruction.action == "remove"
    message = fleet_pb2.Assignment(
        revision=instruction.revision,
        model_namespace=instruction.model_namespace,
        model_name=instruction.model_name,
        version=instruction.version,
        action=_ACTIONS[instruction.action],
        target_paths=[] if remove else instruction.target_paths,
        bundle_sha256="" if remove else instruction.bundle_sha256,
        bundle_length=0 if remove else instruction.bundle_length,
        delta_from_version=instruction.delta_from_version or "",
    )
    if instruction.wave is not None:
        wave = instruction.wave
        message.wave.CopyFrom(fleet_pb2.RolloutWave(index=wave.index, count=wave.count, percent=wave.percent))
    return message


def enroll_response(result: EnrollResult) -> fleet_pb2.EnrollResponse:
    response = fleet_pb2.EnrollResponse(
        certificate_chain_pem=result.certificate_chain_pem.decode(),
        ca_bundle_pem=result.ca_bundle_pem.decode(),
        device_id=result.device_id,
        namespace=result.namespace,
        device_class=result.device_class,
    )
    response.certificate_not_after.FromDatetime(result.not_after)
    response.hints.heartbeat_interval.FromTimedelta(result.hints.heartbeat_interval)
    response.hints.reconnect_backoff_initial.FromTimedelta(result.hints.reconnect_backoff_initial)
    response.hints.reconnect_backoff_max.FromTimedelta(result.hints.reconnect_backoff_max)
    return response


def chunk_message(chunk: FileChunk) -> fleet_pb2.Chunk:
    return fleet_pb2.Chunk(offset=chunk.offset, data=chunk.data, total_length=chunk.total_length, eof=chunk.eof)


# ------------------------------------------------------------------------------------ servicer


class FleetGatewayServicer(fleet_pb2_grpc.FleetGatewayServicer):
    """``edgefleet.v1.FleetGateway`` over a :class:`GatewayService` and an :class:`AssignmentHub`."""

    def __init__(self, service: GatewayService, hub: AssignmentHub, metrics: GatewayMetrics) -> None:
        self._service = service
        self._hub = hub
        self._metrics = metrics
        self._identities: dict[bytes, DeviceIdentity] = {}  # parsed certificates (parsing costs ~0.1 ms)

    async def _device(self, context: Context) -> DeviceIdentity:
        """The caller's identity from its verified certificate, checked against its device record."""
        certificates = list(context.auth_context().get(PEER_CERTIFICATE, ()))
        if not certificates:
            raise Unauthenticated("this call needs the client certificate Enroll issued")
        pem = certificates[0]
        identity = self._identities.get(pem)
        if identity is None:
            try:
                identity = identity_from_certificate(pem)
            except ValueError as e:
                raise Unauthenticated(f"not a device certificate: {e}") from e
            if len(self._identities) >= MAX_CACHED_IDENTITIES:
                self._identities.clear()
            self._identities[pem] = identity
        await self._check(identity)
        return identity

    async def _check(self, identity: DeviceIdentity) -> None:
        """Refuse a revoked or superseded device: on the loop when the cache decides, else in a thread."""
        if self._service.cached_device(identity) is None:
            await asyncio.to_thread(self._service.authenticate, identity)

    async def Enroll(self, request: fleet_pb2.EnrollRequest, context: Context) -> fleet_pb2.EnrollResponse:
        result = await asyncio.to_thread(self._service.enroll, enroll_application(request))
        self._metrics.enrollments.inc()
        return enroll_response(result)

    async def Renew(self, request: fleet_pb2.RenewRequest, context: Context) -> fleet_pb2.EnrollResponse:
        device = await self._device(context)
        result = await asyncio.to_thread(self._service.renew, device, request.csr_pem)
        self._metrics.renewals.inc()
        return enroll_response(result)

    async def WatchAssignments(
        self, request: fleet_pb2.WatchAssignmentsRequest, context: Context
    ) -> AsyncIterator[fleet_pb2.Assignment]:
        device = await self._device(context)
        installed = check_watch(
            request.last_revision,
            (InstalledModel(m.model_namespace, m.model_name, m.version) for m in request.installed),
        )

        async def recheck() -> None:
            await self._check(device)  # a revocation or a newer certificate ends the stream

        stream = self._hub.watch(
            device,
            request.last_revision,
            installed,
            recheck=recheck,
            recheck_interval=self._service.policy.identity_cache_ttl.total_seconds(),
        )
        async for instruction in stream:
            self._metrics.assignments_pushed.inc()
            yield assignment_message(instruction)

    async def FetchMetadata(
        self, request: fleet_pb2.FetchMetadataRequest, context: Context
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        await self._device(context)
        chunks = await asyncio.to_thread(
            self._service.open_metadata, request.role, request.version, request.offset, request.max_length
        )
        async for message in self._send(chunks, "metadata"):
            yield message

    async def FetchTarget(
        self, request: fleet_pb2.FetchTargetRequest, context: Context
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        device = await self._device(context)
        chunks = await asyncio.to_thread(
            self._service.open_target, device, request.target_path, request.offset, request.max_length
        )
        async for message in self._send(chunks, "target"):
            yield message

    async def _send(
        self, chunks: Iterator[FileChunk], kind: Literal["metadata", "target"]
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        counter = self._metrics.bytes_served.labels(kind)
        while True:
            # Reads run in a worker thread (a slow store, S3, must not stall every other call),
            # several chunks per hop: a hop costs more than sending a 1 MiB message.
            batch = await asyncio.to_thread(list, itertools.islice(chunks, CHUNKS_PER_HOP))
            for chunk in batch:
                counter.inc(len(chunk.data))
                yield chunk_message(chunk)
            if len(batch) < CHUNKS_PER_HOP or batch[-1].eof:
                return

    async def ReportHealth(self, request: fleet_pb2.HealthReport, context: Context) -> fleet_pb2.HealthAck:
        device = await self._device(context)
        self._service.report_health(device, health_sample(request))  # in memory: no IO on this path
        self._metrics.health_reports.inc()
        return fleet_pb2.HealthAck()

    async def ReportInstall(self, request: fleet_pb2.InstallReport, context: Context) -> fleet_pb2.InstallAck:
        device = await self._device(context)
        report = install_report(request)
        await asyncio.to_thread(self._service.report_install, device, report)
        self._metrics.install_reports.labels(report.outcome).inc()
        return fleet_pb2.InstallAck()
