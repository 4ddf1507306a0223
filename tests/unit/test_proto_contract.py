"""The wire contract (proto/edgefleet/v1/*.proto) and its committed stubs.

Checks that the stubs are fresh, that every request type survives serialization, that the
services offer exactly the documented methods with the documented streaming kinds, and that the
generated stubs work end to end through a real grpc.aio server on loopback.
"""

from __future__ import annotations

import asyncio
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc, inference_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_PROTO = REPO_ROOT / "scripts" / "gen_proto.py"
STUB_DIR = REPO_ROOT / "proto" / "edgefleet_proto" / "v1"

# protoc runs in a subprocess; generous against a cold start, finite so nothing can hang.
GENERATE_TIMEOUT_S = 120.0
# Bounds every loopback gRPC exchange below.
CALL_TIMEOUT_S = 5.0
TEST_TIMEOUT_S = 20.0

# (method, client_streaming, server_streaming, request type, response type), as documented in
# the .proto files. A method added to a service without updating this table fails the test.
FLEET_GATEWAY_METHODS = {
    ("Enroll", False, False, "EnrollRequest", "EnrollResponse"),
    ("Renew", False, False, "RenewRequest", "EnrollResponse"),
    ("WatchAssignments", False, True, "WatchAssignmentsRequest", "Assignment"),
    ("FetchMetadata", False, True, "FetchMetadataRequest", "Chunk"),
    ("FetchTarget", False, True, "FetchTargetRequest", "Chunk"),
    ("ReportHealth", False, False, "HealthReport", "HealthAck"),
    ("ReportInstall", False, False, "InstallReport", "InstallAck"),
}
INFERENCE_METHODS = {
    ("Predict", False, False, "PredictRequest", "PredictResponse"),
    ("PredictStream", True, True, "PredictRequest", "PredictResponse"),
    ("GetModelStatus", False, False, "GetModelStatusRequest", "GetModelStatusResponse"),
}
ACCELERATOR_STAGE_METHODS = {
    ("LoadStage", False, False, "LoadStageRequest", "LoadStageResponse"),
    ("RunStage", True, True, "StageRequest", "StageResponse"),
    ("UnloadStage", False, False, "UnloadStageRequest", "UnloadStageResponse"),
}

DIGEST = "ab" * 32


def _run_gen_proto(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN_PROTO), *args],
        capture_output=True,
        text=True,
        timeout=GENERATE_TIMEOUT_S,
        check=False,
    )


def _float_tensor(name: str, values: list[float], shape: list[int]) -> inference_pb2.Tensor:
    return inference_pb2.Tensor(
        name=name,
        dtype=inference_pb2.DATA_TYPE_FLOAT,
        shape=shape,
        data=struct.pack(f"<{len(values)}f", *values),
    )


def _request_examples() -> list[Message]:
    """One populated message of every request type of every service."""
    return [
        fleet_pb2.RenewRequest(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n...\n-----END CERTIFICATE REQUEST-----\n"),
        fleet_pb2.EnrollRequest(
            bootstrap_token="token-1",
            csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n...\n-----END CERTIFICATE REQUEST-----\n",
            device_name="cam-0042",
            labels={"site": "berlin", "edgefleet.io/rack": "r7"},
            hardware=fleet_pb2.HardwareFacts(
                cpu_arch="aarch64",
                cpu_cores=6,
                cpu_features=["asimd", "asimddp"],
                memory_bytes=8 << 30,
                accelerators=[
                    fleet_pb2.Accelerator(
                        type="gpu",
                        model="Jetson Orin Nano",
                        memory_bytes=0,
                        execution_providers=["CUDAExecutionProvider"],
                    )
                ],
                execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                storage_free_bytes=20 << 30,
            ),
            agent_version="0.1.0",
        ),
        fleet_pb2.WatchAssignmentsRequest(
            last_revision=41,
            installed=[fleet_pb2.InstalledModel(model_namespace="vision", model_name="det", version="3")],
        ),
        fleet_pb2.FetchMetadataRequest(role="root", version=3, offset=0, max_length=512 * 1024),
        fleet_pb2.FetchTargetRequest(
            target_path=f"edge-arm/det/4/{DIGEST}.manifest.json", offset=1 << 20, max_length=5 << 20
        ),
        fleet_pb2.HealthReport(
            window_start=Timestamp(seconds=1_700_000_000),
            window=Duration(seconds=30),
            cpu_percent=37.5,
            memory_used_bytes=3 << 30,
            memory_total_bytes=8 << 30,
            disk_used_bytes=10 << 30,
            disk_total_bytes=64 << 30,
            models=[
                fleet_pb2.ModelHealth(
                    model_namespace="vision",
                    model_name="det",
                    version="4",
                    slot=fleet_pb2.SLOT_B,
                    inference_count=900,
                    error_count=2,
                    latency_p50_ms=11.5,
                    latency_p95_ms=19.25,
                    latency_p99_ms=31.0,
                    accelerator_fallback_count=1,
                )
            ],
            energy_joules=152.5,
        ),
        fleet_pb2.InstallReport(
            assignment_revision=42,
            model_namespace="vision",
            model_name="det",
            from_version="3",
            to_version="4",
            outcome=fleet_pb2.INSTALL_OUTCOME_REFUSED_VERIFICATION,
            reason="DigestMismatch",
            message="manifest sha256 differs from the assignment",
            failed_phase=fleet_pb2.INSTALL_PHASE_VERIFY,
            durations=fleet_pb2.InstallDurations(
                download=Duration(seconds=4, nanos=500_000_000),
                verify=Duration(nanos=20_000_000),
                total=Duration(seconds=5),
            ),
            active_slot=fleet_pb2.SLOT_A,
            finished_at=Timestamp(seconds=1_700_000_100),
        ),
        inference_pb2.PredictRequest(
            request_id="r-1",
            model_name="det",
            model_version="4",
            inputs=[_float_tensor("images", [0.0, 0.5, 1.0, -1.0], [1, 1, 2, 2])],
            output_names=["boxes"],
            chunk_index=0,
            more_chunks=True,
        ),
        inference_pb2.GetModelStatusRequest(model_name="det"),
        inference_pb2.LoadStageRequest(
            stage_id=DIGEST,
            model_sha256=DIGEST,
            execution_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"],
            max_in_flight=4,
        ),
        inference_pb2.StageRequest(
            stage_id=DIGEST,
            sequence=7,
            inputs=[_float_tensor("/backbone/Relu_3_output_0", [1.0, 2.0], [1, 2])],
            chunk_index=1,
            more_chunks=False,
        ),
        inference_pb2.UnloadStageRequest(stage_id=DIGEST),
    ]


def _services() -> dict[str, tuple[FileDescriptor, set[tuple[str, bool, bool, str, str]]]]:
    return {
        "FleetGateway": (fleet_pb2.DESCRIPTOR, FLEET_GATEWAY_METHODS),
        "Inference": (inference_pb2.DESCRIPTOR, INFERENCE_METHODS),
        "AcceleratorStage": (inference_pb2.DESCRIPTOR, ACCELERATOR_STAGE_METHODS),
    }


# ---------------------------------------------------------------------------------------------
# (a) the committed stubs are what the generator produces
# ---------------------------------------------------------------------------------------------


def test_committed_stubs_match_a_fresh_generation() -> None:
    result = _run_gen_proto("--check")
    assert result.returncode == 0, result.stderr


def test_check_reports_changed_missing_and_extra_files(tmp_path: Path) -> None:
    stubs = tmp_path / "v1"
    shutil.copytree(STUB_DIR, stubs, ignore=shutil.ignore_patterns("__pycache__"))
    with (stubs / "fleet_pb2.py").open("ab") as handle:
        handle.write(b"\n")
    (stubs / "inference_pb2.pyi").unlink()
    (stubs / "stale_pb2.py").write_bytes(b"")

    result = _run_gen_proto("--check", "--output-dir", str(stubs))

    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[:3] == [
        "changed: fleet_pb2.py",
        "missing: inference_pb2.pyi",
        "extra: stale_pb2.py",
    ]


# ---------------------------------------------------------------------------------------------
# (b) messages
# ---------------------------------------------------------------------------------------------


def test_every_request_type_round_trips() -> None:
    examples = _request_examples()
    example_types = {example.DESCRIPTOR.full_name for example in examples}
    request_types = {
        f"edgefleet.v1.{request}" for _, methods in _services().values() for _, _, _, request, _ in methods
    }
    assert example_types == request_types

    for example in examples:
        wire = example.SerializeToString(deterministic=True)
        decoded = type(example).FromString(wire)
        assert decoded == example, example.DESCRIPTOR.full_name
        assert decoded.SerializeToString(deterministic=True) == wire


def test_optional_energy_distinguishes_absent_from_zero() -> None:
    absent = fleet_pb2.HealthReport.FromString(fleet_pb2.HealthReport().SerializeToString())
    zero = fleet_pb2.HealthReport.FromString(fleet_pb2.HealthReport(energy_joules=0.0).SerializeToString())
    assert not absent.HasField("energy_joules")
    assert zero.HasField("energy_joules")


def test_messages_pickle_under_their_import_path() -> None:
    # The generator rewrites the module name protobuf gives the classes; pickling (e.g. to a
    # worker process) finds the class by it.
    report = fleet_pb2.InstallReport(to_version="4", outcome=fleet_pb2.INSTALL_OUTCOME_SUCCEEDED)
    assert type(report).__module__ == "edgefleet_proto.v1.fleet_pb2"
    assert pickle.loads(pickle.dumps(report)) == report


def test_no_request_after_enroll_names_the_device() -> None:
    # Identity comes from the mTLS client certificate only.
    for example in _request_examples():
        if isinstance(example, fleet_pb2.EnrollRequest):
            continue
        names = {field.name for field in example.DESCRIPTOR.fields}
        assert not names & {"device_id", "device_name", "device"}, example.DESCRIPTOR.full_name


def test_data_type_numbers_are_onnx_numbers() -> None:
    onnx = pytest.importorskip("onnx")
    for name, number in inference_pb2.DataType.items():
        if number == inference_pb2.DATA_TYPE_UNSPECIFIED:
            continue
        assert getattr(onnx.TensorProto, name.removeprefix("DATA_TYPE_")) == number, name


# ---------------------------------------------------------------------------------------------
# (c) services
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service_name", sorted(_services()))
def test_service_methods_and_streaming_kinds(service_name: str) -> None:
    file_descriptor, documented = _services()[service_name]
    service = file_descriptor.services_by_name[service_name]
    assert service.full_name == f"edgefleet.v1.{service_name}"
    actual = {
        (
            method.name,
            method.client_streaming,
            method.server_streaming,
            method.input_type.name,
            method.output_type.name,
        )
        for method in service.methods
    }
    assert actual == documented


def test_files_declare_exactly_the_documented_services() -> None:
    assert set(fleet_pb2.DESCRIPTOR.services_by_name) == {"FleetGateway"}
    assert set(inference_pb2.DESCRIPTOR.services_by_name) == {"Inference", "AcceleratorStage"}


# ---------------------------------------------------------------------------------------------
# (d) the generated stubs over a real grpc.aio server
# ---------------------------------------------------------------------------------------------


class _FakeGateway(fleet_pb2_grpc.FleetGatewayServicer):
    """Answers Enroll and WatchAssignments; the rest stay unimplemented."""

    async def Enroll(
        self,
        request: fleet_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[fleet_pb2.EnrollRequest, fleet_pb2.EnrollResponse],
    ) -> fleet_pb2.EnrollResponse:
        return fleet_pb2.EnrollResponse(
            device_id=f"dev-{request.device_name}",
            namespace="vision",
            device_class="edge-arm",
            hints=fleet_pb2.GatewayHints(heartbeat_interval=Duration(seconds=15)),
        )

    async def WatchAssignments(
        self,
        request: fleet_pb2.WatchAssignmentsRequest,
        context: grpc.aio.ServicerContext[fleet_pb2.WatchAssignmentsRequest, fleet_pb2.Assignment],
    ) -> AsyncIterator[fleet_pb2.Assignment]:
        for offset in (1, 2, 3):
            yield fleet_pb2.Assignment(
                revision=request.last_revision + offset,
                model_namespace="vision",
                model_name="det",
                version=str(offset),
                action=fleet_pb2.ASSIGNMENT_ACTION_INSTALL,
                target_paths=[f"edge-arm/det/{offset}/manifest.json"],
                bundle_sha256=DIGEST,
                bundle_length=1234,
            )

    async def FetchMetadata(
        self,
        request: fleet_pb2.FetchMetadataRequest,
        context: grpc.aio.ServicerContext[fleet_pb2.FetchMetadataRequest, fleet_pb2.Chunk],
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        nothing: tuple[fleet_pb2.Chunk, ...] = ()
        for chunk in nothing:  # a yield makes this an async generator, as the servicer base wants
            yield chunk
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    async def FetchTarget(
        self,
        request: fleet_pb2.FetchTargetRequest,
        context: grpc.aio.ServicerContext[fleet_pb2.FetchTargetRequest, fleet_pb2.Chunk],
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        nothing: tuple[fleet_pb2.Chunk, ...] = ()
        for chunk in nothing:  # a yield makes this an async generator, as the servicer base wants
            yield chunk
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    async def Renew(
        self,
        request: fleet_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[fleet_pb2.RenewRequest, fleet_pb2.EnrollResponse],
    ) -> fleet_pb2.EnrollResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    async def ReportHealth(
        self,
        request: fleet_pb2.HealthReport,
        context: grpc.aio.ServicerContext[fleet_pb2.HealthReport, fleet_pb2.HealthAck],
    ) -> fleet_pb2.HealthAck:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    async def ReportInstall(
        self,
        request: fleet_pb2.InstallReport,
        context: grpc.aio.ServicerContext[fleet_pb2.InstallReport, fleet_pb2.InstallAck],
    ) -> fleet_pb2.InstallAck:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")


async def _exchange_with_gateway() -> tuple[fleet_pb2.EnrollResponse, list[fleet_pb2.Assignment], grpc.StatusCode]:
    server = grpc.aio.server()
    fleet_pb2_grpc.add_FleetGatewayServicer_to_server(_FakeGateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fleet_pb2_grpc.FleetGatewayStub(channel)
            enrolled = await stub.Enroll(
                fleet_pb2.EnrollRequest(bootstrap_token="t", device_name="cam-1"),
                timeout=CALL_TIMEOUT_S,
            )
            assignments = [
                assignment
                async for assignment in stub.WatchAssignments(
                    fleet_pb2.WatchAssignmentsRequest(last_revision=41), timeout=CALL_TIMEOUT_S
                )
            ]
            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                await stub.ReportHealth(fleet_pb2.HealthReport(), timeout=CALL_TIMEOUT_S)
            return enrolled, assignments, unimplemented.value.code()
    finally:
        await server.stop(grace=None)


def test_gateway_stubs_over_loopback() -> None:
    async def bounded() -> tuple[fleet_pb2.EnrollResponse, list[fleet_pb2.Assignment], grpc.StatusCode]:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            return await _exchange_with_gateway()

    enrolled, assignments, unimplemented = asyncio.run(bounded())

    assert enrolled.device_id == "dev-cam-1"
    assert enrolled.device_class == "edge-arm"
    assert enrolled.hints.heartbeat_interval.ToSeconds() == 15
    assert [assignment.revision for assignment in assignments] == [42, 43, 44]
    assert {assignment.action for assignment in assignments} == {fleet_pb2.ASSIGNMENT_ACTION_INSTALL}
    assert unimplemented == grpc.StatusCode.UNIMPLEMENTED
