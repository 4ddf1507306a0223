"""Fuzz target: every request type of every gRPC service, sent to the real servers on loopback.

The services are read from the proto descriptors (``FleetGateway`` in fleet.proto, ``Inference``
and ``AcceleratorStage`` in inference.proto) and each method is called generically by its path, so
a method added to a .proto is fuzzed without touching this file; the requests come from
:mod:`tests.support.proto_strategies`, which walks the request's descriptor, with plausible values
(a real bootstrap token and CSR, a real target path, the loaded model's name and input) mixed in
so inputs get past the first check.

The servers are the real ones: :class:`GatewayServer` with mTLS (the device's enrolled
certificate on the fleet port), the agent's Inference server over a loaded model, and the
AcceleratorStage server with a loaded stage, each in one grpc.aio event loop in a thread; the
calls are made with the blocking client from the test thread.

An answer is acceptable when it is OK or a status code the servers give on purpose for bad input
(:data:`REFUSALS`); UNKNOWN or INTERNAL (an unhandled exception), a call that outlives its
deadline (a hang), or a per-request error carrying INTERNAL is a crash. After each service's run a
well-formed call must still succeed.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgefleet_agent.accel_server import start_accel_server
from edgefleet_agent.inference_server import start_inference_server, tensor_message
from edgefleet_agent.remote_stage import place_model
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_core.signing import KeySet, TufRepository
from edgefleet_core.signing.layout import target_path
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.pki import init_pki
from edgefleet_operator.gateway.server import GatewayConfig, GatewayServer
from edgefleet_proto.v1 import fleet_pb2, inference_pb2
from tests.support.proto_strategies import Overrides, message_strategy, variants_of
from tests.support.reliability import fuzz_examples, record_fuzz
from tests.unit.agent.bundle_world import model_bytes

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz, pytest.mark.integration]

REFUSALS: Final = frozenset({
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    # The AcceleratorStage's own documented codes (accel_server.stage_status_code): a model file
    # that does not match its digest, a stage id already taken by another model, a stage unloaded
    # under an open stream.
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
})  # fmt: skip
"""Answers a server may give to any input: OK, or a refusal it gives on purpose."""
CRASH_CODES: Final = frozenset({grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]})
CALL_DEADLINE_S: Final = 20.0
"""Every fuzzed call answers in milliseconds; a call still running after this is a hang."""
WATCH_DEADLINE_S: Final = 0.2
"""WatchAssignments is a stream that stays open: one still open after this was accepted."""

FLEET: Final = fleet_pb2.DESCRIPTOR.services_by_name["FleetGateway"]
INFERENCE: Final = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
ACCELERATOR: Final = inference_pb2.DESCRIPTOR.services_by_name["AcceleratorStage"]
NAMESPACE = "demo"
MODEL = "cpu-small/demo/digits/1.0.0/model.onnx"
PAYLOAD = bytes(range(256)) * 64
WIDTH = 4

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Servers in one event loop in a thread; the blocking client in the test thread


class LoopThread:
    """An asyncio event loop running in a daemon thread, for servers the test calls synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _key_and_csr() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _relu(width: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class Servers:
    loop: LoopThread
    gateway: GatewayServer
    ca_pem: bytes
    tokens: list[str]
    csrs: list[tuple[bytes, str]]
    """(private key PEM, CSR PEM): a pool, so a successful Renew's certificate can be used next."""
    fleet_channel: grpc.Channel
    enroll_channel: grpc.Channel
    inference_channel: grpc.Channel
    accel_channel: grpc.Channel
    stage_digest: str

    def device_channel(self, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
        return _device_channel(self.gateway.fleet_address, self.ca_pem, key_pem, cert_pem)


def _device_channel(address: str, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem))


def _enroll(channel: grpc.Channel, token: str, csr: str, name: str) -> fleet_pb2.EnrollResponse:
    call = channel.unary_unary(
        "/edgefleet.v1.FleetGateway/Enroll",
        request_serializer=fleet_pb2.EnrollRequest.SerializeToString,
        response_deserializer=fleet_pb2.EnrollResponse.FromString,
    )
    response: fleet_pb2.EnrollResponse = call(
        fleet_pb2.EnrollRequest(bootstrap_token=token, csr_pem=csr, device_name=name, agent_version="0.1.0"),
        timeout=CALL_DEADLINE_S,
    )
    return response


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    folder: Path = tmp_path_factory.mktemp("fuzz-grpc")
    loop = LoopThread()
    init_pki(folder / "pki", ["localhost", "127.0.0.1"])
    store = LocalStore(folder / "store")
    repository = TufRepository(store, KeySet.generate())
    repository.initialize()
    repository.publish({MODEL: PAYLOAD})
    fleet = FleetState(store)
    config = GatewayConfig(
        listen="127.0.0.1:0",
        enroll_listen="127.0.0.1:0",
        metrics_listen=None,
        poll_interval=0.05,
        status_interval=0.5,
        identity_cache_ttl=0.5,
        grace_period=0.1,
        gc_freeze_interval=None,  # process-wide: leave the interpreter's collector alone
    )
    gateway = GatewayServer(config, store, folder / "pki")
    loop.run(gateway.start())

    runtime = ModelRuntime()
    runtime.activate(runtime.load(NAMESPACE, "digits", "1.0.0", {"model.onnx": model_bytes(0)}, slot="a"))
    inference, inference_port = loop.run(start_inference_server(runtime, NAMESPACE, "127.0.0.1:0"))
    models = folder / "stages"
    models.mkdir()
    accel, accel_port = loop.run(start_accel_server(models, "127.0.0.1:0", providers=["CPUExecutionProvider"]))
    stage_digest = place_model(models, _relu(WIDTH))

    ca_pem = (folder / "pki" / "ca.pem").read_bytes()
    tokens = [fleet.create_token(NAMESPACE, "cpu-small", ttl=timedelta(hours=2), uses=1000) for _ in range(2)]
    enroll_channel = grpc.secure_channel(gateway.enroll_address, grpc.ssl_channel_credentials(ca_pem))
    key_pem, csr = _key_and_csr()
    enrolled = _enroll(enroll_channel, tokens[0], csr, "fuzz-cam")
    fleet_channel = _device_channel(gateway.fleet_address, ca_pem, key_pem, enrolled.certificate_chain_pem.encode())
    made = Servers(loop, gateway, ca_pem, tokens, [_key_and_csr() for _ in range(3)], fleet_channel, enroll_channel,
                   grpc.insecure_channel(f"127.0.0.1:{inference_port}"),
                   grpc.insecure_channel(f"127.0.0.1:{accel_port}"), stage_digest)  # fmt: skip
    accel_load = made.accel_channel.unary_unary(
        "/edgefleet.v1.AcceleratorStage/LoadStage",
        request_serializer=inference_pb2.LoadStageRequest.SerializeToString,
        response_deserializer=inference_pb2.LoadStageResponse.FromString,
    )
    accel_load(inference_pb2.LoadStageRequest(stage_id="s1", model_sha256=stage_digest), timeout=CALL_DEADLINE_S)
    yield made
    for channel in (made.fleet_channel, made.enroll_channel, made.inference_channel, made.accel_channel):
        channel.close()
    loop.run(accel.stop(None))
    loop.run(inference.stop(None))
    loop.run(gateway.stop(0))
    loop.close()


# --------------------------------------------------------------------------------------------------
# Calling any method generically, and judging the answer


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    responses: list[Message]
    details: str = ""


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(channel: grpc.Channel, method: MethodDescriptor, requests: list[Message], timeout: float) -> Answer:
    """Calls ``method`` with ``requests`` (one unless it is client-streaming); every response, or the code."""
    serializer, reply = GetMessageClass(method.input_type).SerializeToString, GetMessageClass(method.output_type)
    factories: dict[tuple[bool, bool], Callable[..., Any]] = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    stub = factories[(method.client_streaming, method.server_streaming)](
        _path(method), request_serializer=serializer, response_deserializer=reply.FromString
    )
    responses: list[Message] = []
    try:
        argument: Any = iter(requests) if method.client_streaming else requests[0]
        if method.server_streaming:
            responses.extend(stub(argument, timeout=timeout))
        else:
            responses.append(stub(argument, timeout=timeout))
    except grpc.RpcError as error:
        code = error.code()  # grpc's call errors are also grpc.Call
        return Answer(code, responses, error.details() or "")
    return Answer(grpc.StatusCode.OK, responses)


def crash(method: MethodDescriptor, answer: Answer) -> str | None:
    """What is wrong with ``answer``, or ``None`` when it is acceptable."""
    watch = method.server_streaming and not method.client_streaming and method.name == "WatchAssignments"
    if answer.code == grpc.StatusCode.DEADLINE_EXCEEDED and watch:
        return None  # the stream was accepted and stays open, as it should
    if answer.code not in REFUSALS:
        return f"{_path(method)} answered {answer.code.name}: {answer.details[:300]}"
    for response in answer.responses:
        error = getattr(response, "error", None)
        if error is not None and response.HasField("error") and error.code in CRASH_CODES:
            return f"{_path(method)} answered a request with error code {error.code}: {error.message[:300]}"
    return None


Seeds = dict[str, list[Message]]
"""Well-formed requests per method name, which :func:`variants_of` changes a few fields of."""


def _requests(method: MethodDescriptor, overrides: Overrides, seeds: Seeds) -> st.SearchStrategy[list[Message]]:
    single = st.one_of(
        message_strategy(method.input_type, overrides=overrides),
        *(variants_of(seed, overrides=overrides) for seed in seeds.get(method.name, [])),
    )
    return st.lists(single, min_size=1, max_size=3 if method.client_streaming else 1)


def _fuzz_service(
    service: ServiceDescriptor,
    channel_of: Callable[[MethodDescriptor], grpc.Channel],
    overrides: Overrides,
    seeds: Seeds,
    examples: int,
    after: Callable[[MethodDescriptor, list[Message], Answer], None] = lambda m, r, a: None,
) -> Counter[str]:
    """Runs ``examples`` fuzzed calls spread over the service's methods; the calls per method."""
    calls: Counter[str] = Counter()
    methods = list(service.methods)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(methods), label="method")
        requests = data.draw(_requests(method, overrides, seeds), label="requests")
        timeout = WATCH_DEADLINE_S if method.name == "WatchAssignments" else CALL_DEADLINE_S
        answer = call(channel_of(method), method, requests, timeout)
        calls[method.name] += 1
        after(method, requests, answer)
        problem = crash(method, answer)
        assert problem is None, problem

    fuzz()
    return calls


def _record(service: ServiceDescriptor, calls: Counter[str]) -> None:
    record_fuzz(f"gRPC {service.full_name} ({', '.join(m.name for m in service.methods)})",
                executions=sum(calls.values()), crashes_fixed=[])  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Targets


def _timestamp_now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def test_fleet_gateway_answers_every_request_with_ok_or_a_refusal(servers: Servers) -> None:
    path = target_path(MODEL, hashlib.sha256(PAYLOAD).hexdigest()).removeprefix("targets/")
    names = st.sampled_from(["digits", "cam-1", "a" * 300, ""])
    overrides: Overrides = {
        "edgefleet.v1.EnrollRequest.bootstrap_token": st.sampled_from(servers.tokens),
        "edgefleet.v1.EnrollRequest.csr_pem": st.sampled_from([csr for _, csr in servers.csrs]),
        "edgefleet.v1.EnrollRequest.device_name": names,
        "edgefleet.v1.RenewRequest.csr_pem": st.sampled_from([csr for _, csr in servers.csrs]),
        "edgefleet.v1.FetchMetadataRequest.role": st.sampled_from(["root", "timestamp", "snapshot", "targets"]),
        "edgefleet.v1.FetchMetadataRequest.version": st.sampled_from([0, 1, 2]),
        "edgefleet.v1.FetchTargetRequest.target_path": st.sampled_from([path, f"../{path}", path.upper()]),
        "edgefleet.v1.HealthReport.window_start": st.just(_timestamp_now()),
        "edgefleet.v1.HealthReport.window": st.just(duration_pb2.Duration(seconds=10)),
        "edgefleet.v1.ModelHealth.model_namespace": st.just(NAMESPACE),
        "edgefleet.v1.ModelHealth.model_name": names,
        "edgefleet.v1.InstallReport.model_namespace": st.just(NAMESPACE),
        "edgefleet.v1.InstallReport.model_name": names,
        "edgefleet.v1.InstalledModel.model_namespace": st.just(NAMESPACE),
    }

    def channel_of(method: MethodDescriptor) -> grpc.Channel:
        # Enroll is the enrollment port's (no client certificate); everything else needs the device's.
        return servers.enroll_channel if method.name == "Enroll" else servers.fleet_channel

    def after(method: MethodDescriptor, requests: list[Message], answer: Answer) -> None:
        if method.name == "Renew" and answer.code == grpc.StatusCode.OK:
            # The old certificate is retired: carry on as the device would, with the new one.
            (request,) = requests
            key_pem = next(key for key, csr in servers.csrs if csr == request.csr_pem)  # type: ignore[attr-defined]
            (response,) = answer.responses
            servers.fleet_channel.close()
            servers.fleet_channel = servers.device_channel(key_pem, response.certificate_chain_pem.encode())  # type: ignore[attr-defined]

    hardware = fleet_pb2.HardwareFacts(
        cpu_arch="x86_64",
        cpu_cores=4,
        memory_bytes=8 << 30,
        cpu_features=["avx2"],
        execution_providers=["CPUExecutionProvider"],
        storage_free_bytes=1 << 30,
    )
    health = fleet_pb2.HealthReport(
        window_start=_timestamp_now(),
        window=duration_pb2.Duration(seconds=10),
        cpu_percent=12.5,
        memory_used_bytes=1 << 20,
        memory_total_bytes=1 << 30,
    )
    health.models.add(
        model_namespace=NAMESPACE,
        model_name="digits",
        version="1.0.0",
        slot=fleet_pb2.SLOT_A,
        inference_count=100,
        error_count=1,
        latency_p50_ms=1,
        latency_p95_ms=2,
        latency_p99_ms=3,
    )
    seeds: Seeds = {
        "Enroll": [fleet_pb2.EnrollRequest(bootstrap_token=servers.tokens[0], csr_pem=servers.csrs[0][1],
                                           device_name="cam-2", labels={"site": "berlin"}, hardware=hardware,
                                           agent_version="0.1.0")],
        "Renew": [fleet_pb2.RenewRequest(csr_pem=servers.csrs[1][1])],
        "WatchAssignments": [fleet_pb2.WatchAssignmentsRequest(last_revision=0, installed=[
            fleet_pb2.InstalledModel(model_namespace=NAMESPACE, model_name="digits", version="1.0.0")])],
        "FetchMetadata": [fleet_pb2.FetchMetadataRequest(role="root", version=1, max_length=1 << 20),
                          fleet_pb2.FetchMetadataRequest(role="timestamp", max_length=1 << 20)],
        "FetchTarget": [fleet_pb2.FetchTargetRequest(target_path=path, offset=0, max_length=len(PAYLOAD))],
        "ReportHealth": [health],
        "ReportInstall": [fleet_pb2.InstallReport(assignment_revision=1, model_namespace=NAMESPACE, model_name="digits",
                                                  from_version="", to_version="1.0.0", finished_at=_timestamp_now(),
                                                  outcome=fleet_pb2.INSTALL_OUTCOME_SUCCEEDED)],
    }  # fmt: skip
    calls = _fuzz_service(FLEET, channel_of, overrides, seeds, fuzz_examples(150), after)
    _record(FLEET, calls)
    # Still serving: a fresh device enrolls and reports health.
    key_pem, csr = _key_and_csr()
    enrolled = _enroll(servers.enroll_channel, servers.tokens[1], csr, "after-the-fuzz")
    report = fleet_pb2.HealthReport(window_start=_timestamp_now(), window=duration_pb2.Duration(seconds=10))
    with servers.device_channel(key_pem, enrolled.certificate_chain_pem.encode()) as channel:
        answer = call(channel, FLEET.methods_by_name["ReportHealth"], [report], CALL_DEADLINE_S)
    assert answer.code == grpc.StatusCode.OK, answer


def _input(width: int, rows: int = 1) -> inference_pb2.Tensor:
    return tensor_message("x", np.ones((rows, width), np.float32))


def test_inference_answers_every_request_with_ok_or_a_refusal(servers: Servers) -> None:
    good = tensor_message("input", np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32))
    overrides: Overrides = {
        "edgefleet.v1.PredictRequest.model_name": st.sampled_from(["digits", "nope"]),
        "edgefleet.v1.PredictRequest.model_version": st.sampled_from(["", "1.0.0", "9"]),
        "edgefleet.v1.PredictRequest.inputs": st.just([good]),
        "edgefleet.v1.Tensor.name": st.just("input"),
        "edgefleet.v1.Tensor.shape": st.sampled_from([[1, 1, 8, 8], [0, 1, 8, 8], [1 << 40, 1, 8, 8], [-1]]),
        "edgefleet.v1.Tensor.dtype": st.just(inference_pb2.DATA_TYPE_FLOAT),
        "edgefleet.v1.GetModelStatusRequest.model_name": st.sampled_from(["", "digits"]),
    }
    predict = inference_pb2.PredictRequest(request_id="r1", model_name="digits", inputs=[good])
    seeds: Seeds = {
        "Predict": [predict],
        "PredictStream": [predict],
        "GetModelStatus": [inference_pb2.GetModelStatusRequest(model_name="digits")],
    }
    calls = _fuzz_service(INFERENCE, lambda m: servers.inference_channel, overrides, seeds, fuzz_examples(120))
    _record(INFERENCE, calls)
    request = inference_pb2.PredictRequest(model_name="digits", inputs=[good])
    answer = call(servers.inference_channel, INFERENCE.methods_by_name["Predict"], [request], CALL_DEADLINE_S)
    assert answer.code == grpc.StatusCode.OK, answer


def test_accelerator_stage_answers_every_request_with_ok_or_a_refusal(servers: Servers) -> None:
    overrides: Overrides = {
        "edgefleet.v1.LoadStageRequest.model_sha256": st.just(servers.stage_digest),
        "edgefleet.v1.LoadStageRequest.execution_providers": st.just(["CPUExecutionProvider"]),
        "edgefleet.v1.StageRequest.stage_id": st.sampled_from(["s1", "s2"]),
        "edgefleet.v1.StageRequest.inputs": st.just([_input(WIDTH)]),
        "edgefleet.v1.StageRequest.sequence": st.integers(0, 3),
        "edgefleet.v1.Tensor.name": st.just("x"),
        "edgefleet.v1.Tensor.dtype": st.just(inference_pb2.DATA_TYPE_FLOAT),
        "edgefleet.v1.Tensor.shape": st.sampled_from([[1, WIDTH], [0, WIDTH], [1 << 40, WIDTH], [-1]]),
        # Unloading the stage the other requests use would make most of them NOT_FOUND: rarely "s1".
        "edgefleet.v1.UnloadStageRequest.stage_id": st.sampled_from(["s2", "s3", "s3", "s1"]),
    }

    def after(method: MethodDescriptor, requests: list[Message], answer: Answer) -> None:
        if method.name == "UnloadStage":
            load = inference_pb2.LoadStageRequest(stage_id="s1", model_sha256=servers.stage_digest)
            assert call(servers.accel_channel, ACCELERATOR.methods_by_name["LoadStage"], [load],
                        CALL_DEADLINE_S).code in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS)  # fmt: skip

    seeds: Seeds = {
        "LoadStage": [inference_pb2.LoadStageRequest(stage_id="s2", model_sha256=servers.stage_digest,
                                                     execution_providers=["CPUExecutionProvider"], max_in_flight=2)],
        "RunStage": [inference_pb2.StageRequest(stage_id="s1", sequence=0, inputs=[_input(WIDTH, rows=2)])],
        "UnloadStage": [inference_pb2.UnloadStageRequest(stage_id="s2")],
    }  # fmt: skip
    calls = _fuzz_service(ACCELERATOR, lambda m: servers.accel_channel, overrides, seeds, fuzz_examples(120), after)
    _record(ACCELERATOR, calls)
    load = inference_pb2.LoadStageRequest(stage_id="s1", model_sha256=servers.stage_digest)
    call(servers.accel_channel, ACCELERATOR.methods_by_name["LoadStage"], [load], CALL_DEADLINE_S)
    run = inference_pb2.StageRequest(stage_id="s1", sequence=0, inputs=[_input(WIDTH)])
    answer = call(servers.accel_channel, ACCELERATOR.methods_by_name["RunStage"], [run], CALL_DEADLINE_S)
    assert answer.code == grpc.StatusCode.OK, answer
    assert answer.responses, answer
    assert not answer.responses[0].HasField("error"), answer
