"""The gateway over real grpc.aio and real TLS on loopback: enrollment, mTLS, artifacts, health, pushes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet_core.signing import KeySet, TufRepository
from edgefleet_core.signing.layout import target_path
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.pki import FleetCA, init_pki
from edgefleet_operator.gateway.server import GatewayConfig, GatewayServer
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc
from tests.support.device_keys import key_and_csr

pytestmark = pytest.mark.integration

MODEL = "cpu-small/demo/digits/1.0.0/model.onnx"
OTHER_CLASS_MODEL = "gpu-big/demo/digits/1.0.0/model.onnx"
PAYLOAD = os.urandom(2 * 1024 * 1024 + 12345)
SHA = "ab" * 32


class Clock:
    """Wall-clock time plus an offset the test can move forward (token expiry, cache time)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Site:
    folder: Path
    store: LocalStore
    fleet: FleetState
    clock: Clock
    ca_pem: bytes
    servers: list[GatewayServer] = field(default_factory=list)

    async def gateway(self) -> GatewayServer:
        config = GatewayConfig(
            listen="127.0.0.1:0",
            enroll_listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            poll_interval=0.02,
            status_interval=0.1,
            identity_cache_ttl=0.2,
            grace_period=0.5,
            loop_stall_seconds=0.5,
            gc_freeze_interval=None,  # process-wide: tests run many servers in one interpreter
        )
        server = GatewayServer(config, self.store, self.folder / "pki", clock=self.clock)
        await server.start()
        self.servers.append(server)
        return server

    def token(self, device_class: str = "cpu-small", ttl: timedelta = timedelta(hours=1)) -> str:
        return self.fleet.create_token("demo", device_class, ttl=ttl)


@pytest_asyncio.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    init_pki(tmp_path / "pki", ["localhost", "127.0.0.1"])
    clock = Clock()
    store = LocalStore(tmp_path / "store")
    repo = TufRepository(store, KeySet.generate())
    repo.initialize()
    repo.publish({MODEL: PAYLOAD, OTHER_CLASS_MODEL: b"other class"})
    made = Site(tmp_path, store, FleetState(store, clock=clock), clock, (tmp_path / "pki" / "ca.pem").read_bytes())
    yield made
    for server in made.servers:
        await server.stop(0)


@pytest_asyncio.fixture
async def gateway(site: Site) -> GatewayServer:
    return await site.gateway()


@dataclass
class Device:
    key_pem: bytes
    cert_pem: bytes


def _channel(address: str, ca_pem: bytes, device: Device | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=device.key_pem if device else None,
        certificate_chain=device.cert_pem if device else None,
    )
    return grpc.aio.secure_channel(address, credentials)


async def _enroll(site: Site, gateway: GatewayServer, name: str = "cam-1", token: str | None = None) -> Device:
    key_pem, csr = key_and_csr()
    async with _channel(gateway.enroll_address, site.ca_pem) as channel:
        response = await fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(
            fleet_pb2.EnrollRequest(
                bootstrap_token=token or site.token(),
                csr_pem=csr,
                device_name=name,
                agent_version="0.1.0",
                hardware=fleet_pb2.HardwareFacts(cpu_arch="x86_64", cpu_cores=2),
            ),
            timeout=10,
        )
    assert response.ca_bundle_pem.encode() == site.ca_pem
    return Device(key_pem, response.certificate_chain_pem.encode())


def _stub(channel: grpc.aio.Channel) -> fleet_pb2_grpc.FleetGatewayAsyncStub:
    return fleet_pb2_grpc.FleetGatewayStub(channel)


def _report(inferences: int = 100) -> fleet_pb2.HealthReport:
    report = fleet_pb2.HealthReport(
        cpu_percent=10, memory_used_bytes=1, memory_total_bytes=2, disk_used_bytes=1, disk_total_bytes=2
    )
    report.window_start.CopyFrom(timestamp_pb2.Timestamp(seconds=int(time.time())))
    report.window.CopyFrom(duration_pb2.Duration(seconds=1))
    report.models.add(
        model_namespace="demo",
        model_name="digits",
        version="1.0.0",
        slot=fleet_pb2.SLOT_A,
        inference_count=inferences,
        error_count=1,
        latency_p50_ms=1,
        latency_p95_ms=2,
        latency_p99_ms=3,
    )
    return report


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def _drain(stream: AsyncIterable[fleet_pb2.Chunk]) -> list[fleet_pb2.Chunk]:
    return [chunk async for chunk in stream]


async def _status(stream: AsyncIterable[object]) -> grpc.StatusCode:
    try:
        async for _ in stream:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_enroll_then_mtls_calls_work_and_health_is_serving(site: Site, gateway: GatewayServer) -> None:
    device = await _enroll(site, gateway)
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        await _stub(channel).ReportHealth(_report(), timeout=10)
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    async with _channel(gateway.enroll_address, site.ca_pem) as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="edgefleet.v1.FleetGateway"), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_healthz_fails_while_the_event_loop_is_blocked_and_recovers(gateway: GatewayServer) -> None:
    import threading
    import urllib.error
    import urllib.request

    url = f"http://{gateway.metrics_address}/healthz"

    def probe() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    assert await asyncio.to_thread(probe) == (200, "ok\n")
    answers: list[tuple[int, str]] = []
    blocked = threading.Event()

    def probe_while_blocked() -> None:
        blocked.wait(5)
        time.sleep(1.0)  # past loop_stall_seconds (0.5 s) into the 2 s block
        answers.append(probe())

    kubelet = threading.Thread(target=probe_while_blocked)
    kubelet.start()
    blocked.set()
    time.sleep(2.0)  # a handler that blocks the loop (deliberately: the probe must notice)
    await asyncio.to_thread(kubelet.join, 10)
    ((code, message),) = answers
    assert code == 503
    assert "the event loop has not run for" in message
    await asyncio.sleep(0.1)  # the heartbeat runs again
    assert await asyncio.to_thread(probe) == (200, "ok\n")
    assert (await asyncio.to_thread(urllib.request.urlopen, f"http://{gateway.metrics_address}/metrics")).status == 200


@pytest.mark.asyncio
async def test_bad_tokens_are_unauthenticated(site: Site, gateway: GatewayServer) -> None:
    expiring = site.token(ttl=timedelta(minutes=1))
    used = site.token()
    await _enroll(site, gateway, "cam-1", used)
    site.clock.offset = timedelta(minutes=2)
    for token in (expiring, used, "eft1.0123456789abcdef." + "A" * 43):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _enroll(site, gateway, "cam-2", token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.asyncio
async def test_foreign_ca_certificates_never_get_through(site: Site, gateway: GatewayServer) -> None:
    stranger = FleetCA.create()
    key_pem, csr = key_and_csr()
    issued = stranger.sign_device_csr(csr.encode(), namespace="demo", device_class="cpu-small", name="cam-1")
    async with _channel(gateway.fleet_address, site.ca_pem, Device(key_pem, issued.certificate_pem)) as channel:
        code = await _code(_stub(channel).ReportHealth(_report(), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no status from the server


@pytest.mark.asyncio
async def test_revoked_devices_are_denied_and_the_enroll_port_refuses_other_calls(
    site: Site, gateway: GatewayServer
) -> None:
    device = await _enroll(site, gateway)
    async with _channel(gateway.enroll_address, site.ca_pem) as channel:
        assert await _code(_stub(channel).ReportHealth(_report(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        fetch = _stub(channel).FetchMetadata(fleet_pb2.FetchMetadataRequest(role="root", version=1, max_length=1 << 20))
        assert await _status(fetch) == grpc.StatusCode.UNAUTHENTICATED
    site.fleet.revoke_device("demo", "cam-1")
    site.clock.offset = timedelta(seconds=1)  # past the gateway's identity cache time
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        assert await _code(_stub(channel).ReportHealth(_report(), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.asyncio
async def test_renew_over_mtls_retires_the_old_certificate(site: Site, gateway: GatewayServer) -> None:
    old = await _enroll(site, gateway)
    key_pem, csr = key_and_csr()
    async with _channel(gateway.fleet_address, site.ca_pem, old) as channel:
        response = await _stub(channel).Renew(fleet_pb2.RenewRequest(csr_pem=csr), timeout=10)
        assert (response.device_id, response.namespace, response.device_class) == ("demo.cam-1", "demo", "cpu-small")
        assert response.ca_bundle_pem.encode() == site.ca_pem
        # Until the new certificate is in use the old one stays accepted (the response may be lost).
        await _stub(channel).ReportHealth(_report(), timeout=10)
    site.clock.offset = timedelta(hours=25)  # past the renewal grace
    async with _channel(gateway.fleet_address, site.ca_pem, old) as channel:
        # The old certificate still completes the handshake (same CA) but is no longer the device's.
        assert await _code(_stub(channel).ReportHealth(_report(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(_stub(channel).Renew(fleet_pb2.RenewRequest(csr_pem=csr), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    new = Device(key_pem, response.certificate_chain_pem.encode())
    async with _channel(gateway.fleet_address, site.ca_pem, new) as channel:
        await _stub(channel).ReportHealth(_report(), timeout=10)
    async with _channel(gateway.enroll_address, site.ca_pem) as channel:  # no certificate: not Enroll
        code = await _code(_stub(channel).Renew(fleet_pb2.RenewRequest(csr_pem=csr), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    site.fleet.revoke_device("demo", "cam-1")
    site.clock.offset = timedelta(hours=25, seconds=1)  # past the gateway's identity cache time
    async with _channel(gateway.fleet_address, site.ca_pem, new) as channel:
        code = await _code(_stub(channel).Renew(fleet_pb2.RenewRequest(csr_pem=key_and_csr()[1]), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.asyncio
async def test_an_open_watch_stream_ends_when_the_device_is_revoked(site: Site, gateway: GatewayServer) -> None:
    device = await _enroll(site, gateway)
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        stream = _stub(channel).WatchAssignments(fleet_pb2.WatchAssignmentsRequest(last_revision=0))
        deadline = time.monotonic() + 10
        while gateway.hub.connected_devices() == 0:
            assert time.monotonic() < deadline, "watch never registered"
            await asyncio.sleep(0.01)
        site.fleet.revoke_device("demo", "cam-1")
        site.clock.offset = timedelta(seconds=1)  # past the identity cache time (0.2 s): the recheck reads
        assert await asyncio.wait_for(_status(stream), timeout=10) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.asyncio
async def test_metadata_and_targets_stream_in_chunks_resume_and_stay_in_class(
    site: Site, gateway: GatewayServer
) -> None:
    device = await _enroll(site, gateway)
    path = target_path(MODEL, hashlib.sha256(PAYLOAD).hexdigest()).removeprefix("targets/")
    other = target_path(OTHER_CLASS_MODEL, hashlib.sha256(b"other class").hexdigest())
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        stub = _stub(channel)
        root = await _drain(
            stub.FetchMetadata(fleet_pb2.FetchMetadataRequest(role="root", version=1, max_length=1 << 20))
        )
        assert root[-1].eof
        assert b"".join(c.data for c in root) == site.store.get("tuf/metadata/1.root.json", max_bytes=1 << 20)
        timestamp = await _drain(
            stub.FetchMetadata(fleet_pb2.FetchMetadataRequest(role="timestamp", max_length=1 << 20))
        )
        assert timestamp[0].total_length == len(timestamp[0].data)

        chunks = await _drain(stub.FetchTarget(fleet_pb2.FetchTargetRequest(target_path=path, max_length=len(PAYLOAD))))
        assert [c.offset for c in chunks] == [0, 1 << 20, 2 << 20]
        assert all(len(c.data) <= 1 << 20 for c in chunks)
        assert b"".join(c.data for c in chunks) == PAYLOAD
        assert [c.eof for c in chunks] == [False, False, True]
        resumed = await _drain(
            stub.FetchTarget(fleet_pb2.FetchTargetRequest(target_path=path, offset=1_500_000, max_length=2**64 - 1))
        )
        assert b"".join(c.data for c in resumed) == PAYLOAD[1_500_000:]

        async def code(request: fleet_pb2.FetchTargetRequest | fleet_pb2.FetchMetadataRequest) -> grpc.StatusCode:
            if isinstance(request, fleet_pb2.FetchTargetRequest):
                return await _status(stub.FetchTarget(request, timeout=10))
            return await _status(stub.FetchMetadata(request, timeout=10))

        T, M = fleet_pb2.FetchTargetRequest, fleet_pb2.FetchMetadataRequest
        assert (
            await code(T(target_path=other.removeprefix("targets/"), max_length=100))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            await code(T(target_path=path, offset=len(PAYLOAD) + 1, max_length=1 << 30)) == grpc.StatusCode.OUT_OF_RANGE
        )
        assert await code(T(target_path=path, max_length=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await code(T(target_path="cpu-small/demo/missing", max_length=10)) == grpc.StatusCode.NOT_FOUND
        for bad in (
            T(target_path=path, max_length=0),
            T(target_path="", max_length=10),
            T(target_path="cpu-small/../gpu-big/x", max_length=10),
            T(target_path="cpu-small/" + "a" * 10_000, max_length=10),
            T(target_path=path, offset=2**64 - 1, max_length=10),
            M(role="", max_length=10),
            M(role="..", max_length=10),
            M(role="root", max_length=0),
        ):
            assert await code(bad) == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert await code(M(role="root", version=99, max_length=10)) == grpc.StatusCode.NOT_FOUND
        # Still serving after all of that.
        await stub.ReportHealth(_report(), timeout=10)


@pytest.mark.asyncio
async def test_malformed_reports_are_invalid_argument(site: Site, gateway: GatewayServer) -> None:
    device = await _enroll(site, gateway)
    bad_window = _report()
    bad_window.ClearField("window")
    bad_slot = _report()
    bad_slot.models[0].slot = fleet_pb2.Slot.ValueType(7)
    bad_time = _report()
    bad_time.window_start.seconds = 2**62
    bad_install = fleet_pb2.InstallReport(assignment_revision=1, model_namespace="demo", model_name="digits")
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        stub = _stub(channel)
        for report in (bad_window, bad_slot, bad_time):
            assert await _code(stub.ReportHealth(report, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _code(stub.ReportInstall(bad_install, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        await stub.ReportHealth(_report(), timeout=10)


@pytest.mark.asyncio
async def test_a_new_assignment_is_pushed_to_a_watching_device(site: Site, gateway: GatewayServer) -> None:
    device = await _enroll(site, gateway)
    async with _channel(gateway.fleet_address, site.ca_pem, device) as channel:
        stream = _stub(channel).WatchAssignments(fleet_pb2.WatchAssignmentsRequest(last_revision=0))
        deadline = time.monotonic() + 10
        while gateway.hub.connected_devices() == 0:
            assert time.monotonic() < deadline, "watch never registered"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        revision = site.fleet.assign(
            "demo",
            ["cam-1"],
            model_namespace="demo",
            model_name="digits",
            version="1.0.0",
            action="install",
            target_paths=[MODEL],
            bundle_sha256=SHA,
            bundle_length=10,
        )
        assignment = await asyncio.wait_for(stream.read(), timeout=5)
        assert time.monotonic() - started < 5.0  # a push, not a poll by the client: well under this
        assert isinstance(assignment, fleet_pb2.Assignment)
        assert (assignment.revision, assignment.version, assignment.action) == (
            revision,
            "1.0.0",
            fleet_pb2.ASSIGNMENT_ACTION_INSTALL,
        )
        assert list(assignment.target_paths) == [MODEL]
        stream.cancel()


@pytest.mark.asyncio
async def test_two_gateways_sharing_a_store_give_one_aggregate(site: Site, gateway: GatewayServer) -> None:
    second = await site.gateway()
    one = await _enroll(site, gateway, "cam-1")
    two = await _enroll(site, second, "cam-2")
    for server, device, inferences in ((gateway, one, 100), (second, two, 50)):
        async with _channel(server.fleet_address, site.ca_pem, device) as channel:
            await _stub(channel).ReportHealth(_report(inferences), timeout=10)
    deadline = time.monotonic() + 10
    while True:
        aggregates = site.fleet.aggregate("demo", "digits")
        if aggregates and aggregates[0].devices_reporting == 2:
            break
        assert time.monotonic() < deadline, f"aggregate never covered both devices: {aggregates}"
        await asyncio.sleep(0.05)
    [aggregate] = aggregates
    assert (aggregate.inference_count, aggregate.error_count) == (150, 2)


def test_serve_prints_its_addresses_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    init_pki(tmp_path / "pki", ["127.0.0.1"])
    command = [
        sys.executable,
        "-m",
        "edgefleet_core.cli",
        "gateway",
        "serve",
        "--store",
        f"file://{tmp_path}/store",
        "--pki",
        str(tmp_path / "pki"),
        "--listen",
        "127.0.0.1:0",
        "--enroll-listen",
        "127.0.0.1:0",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("gateway listening fleet=127.0.0.1:"), line
            fleet_port = int(line.split()[2].rsplit(":", 1)[1])
            enroll_port = int(line.split()[3].rsplit(":", 1)[1])
            assert fleet_port > 0
            assert enroll_port > 0
            assert fleet_port != enroll_port
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
