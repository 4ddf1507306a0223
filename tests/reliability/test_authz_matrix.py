"""The authorization matrix: every FleetGateway method x every kind of caller, over real gRPC and mTLS on loopback.

One real gateway (both listeners), one store, one CA. "This device" is ``demo/cam-a`` of class
``cpu-small``; every other caller tries to act on its data (its class's targets, its assignment,
its install reports, its identity) or simply to get any answer at all. Requests carry no device id:
the identity comes from the verified certificate, so "another device acting for cam-a" can only
ever act as itself, which the cells check (what it gets back is its own, cam-a's data is untouched).

Expected outcomes (the ``EXPECTED`` table below is the contract; the test asserts each observed cell
equals it and that no refused call carried a single response message):

* ``no-client-cert``, ``foreign-ca``, ``expired-cert`` on the fleet port: the TLS handshake fails,
  so the client sees UNAVAILABLE and the server never runs a handler;
* ``non-device-cert`` (signed by the fleet CA, no device URI) and ``superseded-cert`` (the device
  re-enrolled since): UNAUTHENTICATED;
* ``revoked``: PERMISSION_DENIED for every method, Renew included;
* ``other-device`` (same class): OK but scoped to itself (its own identity, assignments, health);
  an install report naming cam-a's revision is INVALID_ARGUMENT (never assigned to the caller);
  the class's targets are shared by the class, so fetching them is OK;
* ``other-class``: FetchTarget of ``cpu-small/...`` is PERMISSION_DENIED whether the path exists
  or not (no probing); TUF metadata is fleet-wide by design (signed, it names targets and hashes but
  holds no model bytes), so FetchMetadata is OK;
* Enroll: unknown, malformed, expired or used token UNAUTHENTICATED; empty token INVALID_ARGUMENT
  (a required field); taking an enrolled or a revoked device's name with a token not pinned to it
  PERMISSION_DENIED.

The enrollment port serves Enroll and health only: every other method is UNAUTHENTICATED there,
even when the client presents a valid device certificate (the port never asks for one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet_agent import accel_cli
from edgefleet_agent.daemon import AgentSettings
from edgefleet_agent.inference_server import is_local_address
from edgefleet_core.signing import KeySet, TufRepository
from edgefleet_core.signing.layout import TARGETS_DIR, target_path
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.pki import CA_KEY, FleetCA, init_pki
from edgefleet_operator.gateway.server import GatewayConfig, GatewayServer
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc
from tests.support.device_keys import key_and_csr
from tests.support.reliability import record_matrix

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

CLASS = "cpu-small"
OTHER_CLASS = "gpu-big"
MODEL = f"{CLASS}/demo/digits/1.0.0/model.onnx"
OTHER_MODEL = f"{OTHER_CLASS}/demo/digits/1.0.0/model.onnx"
CLASS_BYTES = b"cpu-small model bytes " * 200
OTHER_CLASS_BYTES = b"gpu-big model bytes " * 200
CLASS_TARGET = target_path(MODEL, hashlib.sha256(CLASS_BYTES).hexdigest()).removeprefix(TARGETS_DIR)
"""Where the gateway serves this class's model from (hash-prefixed, as TUF clients ask for it)."""
OTHER_CLASS_TARGET = target_path(OTHER_MODEL, hashlib.sha256(OTHER_CLASS_BYTES).hexdigest()).removeprefix(TARGETS_DIR)
MISSING = f"{CLASS}/demo/digits/9.9.9/{'cd' * 32}.model.onnx"
SHA = "ab" * 32

OK = "OK"
OWN = "OK (caller's own data only)"
HANDSHAKE = "UNAVAILABLE (TLS handshake refused)"
UNAUTHENTICATED = "UNAUTHENTICATED"
DENIED = "PERMISSION_DENIED"
INVALID = "INVALID_ARGUMENT"

METHODS = ("Enroll", "Renew", "WatchAssignments", "FetchMetadata", "FetchTarget", "ReportHealth", "ReportInstall")
_REFUSED_BY_CERT = {
    "no-client-cert": HANDSHAKE,
    "foreign-ca": HANDSHAKE,
    "expired-cert": HANDSHAKE,
    "non-device-cert": UNAUTHENTICATED,
    "superseded-cert": UNAUTHENTICATED,
    "revoked": DENIED,
}
EXPECTED: dict[str, dict[str, str]] = {
    "Enroll": {
        "valid-token": OK,
        "no-token": INVALID,
        "unknown-token": UNAUTHENTICATED,
        "malformed-token": UNAUTHENTICATED,
        "expired-token": UNAUTHENTICATED,
        "used-token": UNAUTHENTICATED,
        "other-device (its name, unpinned token)": DENIED,
        "revoked (its name, unpinned token)": DENIED,
        "fleet port, no-client-cert": HANDSHAKE,
    },
    "Renew": {"device": OK, **_REFUSED_BY_CERT, "other-device": OWN, "other-class": OWN},
    "WatchAssignments": {"device": OK, **_REFUSED_BY_CERT, "other-device": OWN, "other-class": OWN},
    "FetchMetadata": {"device": OK, **_REFUSED_BY_CERT, "other-device": OK, "other-class": OK},
    "FetchTarget": {
        "device": OK,
        **_REFUSED_BY_CERT,
        "other-device": OK,
        "other-class": DENIED,
        "other-class (missing path)": DENIED,
    },
    "ReportHealth": {"device": OK, **_REFUSED_BY_CERT, "other-device": OWN, "other-class": OWN},
    "ReportInstall": {"device": OK, **_REFUSED_BY_CERT, "other-device": INVALID, "other-class": INVALID},
}
ENROLL_PORT_EXPECTED: dict[str, dict[str, str]] = {
    method: {"no-client-cert": UNAUTHENTICATED, "device-cert presented": UNAUTHENTICATED}
    for method in METHODS
    if method != "Enroll"
}
ENROLL_PORT_EXPECTED["Enroll"] = {"no-client-cert": OK}
ENROLL_PORT_EXPECTED["grpc.health.v1.Health/Check"] = {"no-client-cert": OK}


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass(frozen=True)
class Credentials:
    """What a caller presents in the TLS handshake (``None``: no client certificate)."""

    key_pem: bytes | None = None
    cert_pem: bytes | None = None


@dataclass
class Site:
    folder: Path
    fleet: FleetState
    clock: Clock
    ca_pem: bytes
    gateway: GatewayServer

    def token(self, device_class: str = CLASS, **kwargs: Any) -> str:
        kwargs.setdefault("ttl", timedelta(hours=1))
        return self.fleet.create_token("demo", device_class, **kwargs)

    def channel(self, credentials: Credentials | None, *, enroll_port: bool = False) -> grpc.aio.Channel:
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=credentials.key_pem if credentials else None,
            certificate_chain=credentials.cert_pem if credentials else None,
        )
        address = self.gateway.enroll_address if enroll_port else self.gateway.fleet_address
        return grpc.aio.secure_channel(address, tls)


def _enroll_request(token: str, name: str, csr: str, device_class: str = CLASS) -> fleet_pb2.EnrollRequest:
    return fleet_pb2.EnrollRequest(
        bootstrap_token=token,
        csr_pem=csr,
        device_name=name,
        agent_version="0.1.0",
        hardware=fleet_pb2.HardwareFacts(cpu_arch="x86_64", cpu_cores=2),
    )


async def _enroll(site: Site, name: str, token: str) -> Credentials:
    key_pem, csr = key_and_csr()
    async with site.channel(None, enroll_port=True) as channel:
        response = await fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(_enroll_request(token, name, csr), timeout=10)
    return Credentials(key_pem, response.certificate_chain_pem.encode())


def _non_device_certificate(site: Site) -> Credentials:
    """Signed by the fleet CA (as a stolen CA key or a mis-issued certificate would be) but naming no device."""
    ca = FleetCA.load(site.folder / "pki")
    ca_key = serialization.load_pem_private_key((site.folder / "pki" / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo.cam-a")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Credentials(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        certificate.public_bytes(serialization.Encoding.PEM),
    )


async def _expired_current_certificate(site: Site, name: str) -> Credentials:
    """An enrolled device whose *current* certificate (the one its record names) has expired.

    Only the handshake's validity check stands between it and a call: the device record accepts
    its serial, so a gateway that skipped the expiry check would let it through.
    """
    await _enroll(site, name, site.token())
    key_pem, csr = key_and_csr()
    past = datetime.now(UTC) - timedelta(days=2)
    issued = FleetCA.load(site.folder / "pki").sign_device_csr(
        csr.encode(), namespace="demo", device_class=CLASS, name=name, validity=timedelta(days=1), now=past
    )
    record = site.fleet.get_device("demo", name)
    assert record is not None
    site.fleet.put_device(record.model_copy(update={"cert_serial": issued.serial, "cert_not_after": issued.not_after}))
    return Credentials(key_pem, issued.certificate_pem)


def _foreign_certificate() -> Credentials:
    stranger = FleetCA.create()
    key_pem, csr = key_and_csr()
    issued = stranger.sign_device_csr(csr.encode(), namespace="demo", device_class=CLASS, name="cam-a")
    return Credentials(key_pem, issued.certificate_pem)


def _health_report(inferences: int) -> fleet_pb2.HealthReport:
    report = fleet_pb2.HealthReport(
        cpu_percent=10, memory_used_bytes=1, memory_total_bytes=2, disk_used_bytes=1, disk_total_bytes=2
    )
    report.window_start.CopyFrom(timestamp_pb2.Timestamp(seconds=int(time.time())))
    report.window.CopyFrom(duration_pb2.Duration(seconds=1))
    report.models.add(
        model_namespace="demo", model_name="digits", version="1.0.0", slot=fleet_pb2.SLOT_A,
        inference_count=inferences, error_count=0, latency_p50_ms=1, latency_p95_ms=2, latency_p99_ms=3,
    )  # fmt: skip
    return report


@dataclass
class Answer:
    """What one call got: the status, and every response message that arrived before it ended."""

    code: grpc.StatusCode
    messages: list[Any]
    details: str = ""


async def _unary(call: Awaitable[Any]) -> Answer:
    try:
        return Answer(grpc.StatusCode.OK, [await call])
    except grpc.aio.AioRpcError as e:
        return Answer(e.code(), [], e.details() or "")


async def _stream(call: Any, *, first_only: bool = False) -> Answer:
    messages: list[Any] = []
    try:
        if first_only:  # a watch stream never ends by itself: its first message is the answer
            messages.append(await asyncio.wait_for(call.read(), timeout=10))
            call.cancel()
        else:
            async for message in call:
                messages.append(message)
    except grpc.aio.AioRpcError as e:
        return Answer(e.code(), messages, e.details() or "")
    return Answer(grpc.StatusCode.OK, messages)


def _label(answer: Answer) -> str:
    if answer.code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in answer.details:
        return HANDSHAKE  # no server status: the connection never carried a call
    return answer.code.name


@dataclass
class Revisions:
    this_device: int
    other_device: int
    other_class: int


Scope = Callable[[Answer], bool]
"""Whether an OK answer holds only the caller's own data (checked for the "own data only" cells)."""


async def _call_method(method: str, channel: grpc.aio.Channel, revisions: Revisions, inferences: int) -> Answer:
    stub = fleet_pb2_grpc.FleetGatewayStub(channel)
    if method == "Renew":
        return await _unary(stub.Renew(fleet_pb2.RenewRequest(csr_pem=key_and_csr()[1]), timeout=10))
    if method == "WatchAssignments":
        return await _stream(stub.WatchAssignments(fleet_pb2.WatchAssignmentsRequest(last_revision=0)), first_only=True)
    if method == "FetchMetadata":
        request = fleet_pb2.FetchMetadataRequest(role="root", version=1, max_length=1 << 20)
        return await _stream(stub.FetchMetadata(request, timeout=10))
    if method == "FetchTarget":
        return await _stream(
            stub.FetchTarget(fleet_pb2.FetchTargetRequest(target_path=CLASS_TARGET, max_length=1 << 20))
        )
    if method == "ReportHealth":
        return await _unary(stub.ReportHealth(_health_report(inferences), timeout=10))
    assert method == "ReportInstall"
    report = fleet_pb2.InstallReport(
        assignment_revision=revisions.this_device,  # cam-a's revision, whoever reports it
        model_namespace="demo",
        model_name="digits",
        from_version="",
        to_version="1.0.0",
        outcome=fleet_pb2.INSTALL_OUTCOME_FAILED,
        failed_phase=fleet_pb2.INSTALL_PHASE_SELF_TEST,
        reason="Forged",
        message="reported by whoever holds this certificate",
    )
    return await _unary(stub.ReportInstall(report, timeout=10))


@pytest_asyncio.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    init_pki(tmp_path / "pki", ["localhost", "127.0.0.1"])
    clock = Clock()
    store = LocalStore(tmp_path / "store")
    repo = TufRepository(store, KeySet.generate())
    repo.initialize()
    repo.publish({MODEL: CLASS_BYTES, OTHER_MODEL: OTHER_CLASS_BYTES})
    config = GatewayConfig(
        listen="127.0.0.1:0",
        enroll_listen="127.0.0.1:0",
        poll_interval=0.02,
        status_interval=60,  # flushed by the test itself
        identity_cache_ttl=0.2,
        grace_period=0.2,
        gc_freeze_interval=None,  # process-wide: tests run many servers in one interpreter
    )
    gateway = GatewayServer(config, store, tmp_path / "pki", clock=clock)
    await gateway.start()
    made = Site(tmp_path, FleetState(store, clock=clock), clock, (tmp_path / "pki" / "ca.pem").read_bytes(), gateway)
    yield made
    await gateway.stop(0)


def _assign(site: Site, name: str, version: str, target: str) -> int:
    return site.fleet.assign(
        "demo", [name], model_namespace="demo", model_name="digits", version=version, action="install",
        target_paths=[target], bundle_sha256=SHA, bundle_length=10,
    )  # fmt: skip


async def _callers(site: Site) -> tuple[dict[str, Credentials | None], Revisions]:
    """Enroll everyone, assign, revoke and supersede; the credentials each caller presents."""
    device = await _enroll(site, "cam-a", site.token())
    other = await _enroll(site, "cam-b", site.token())
    other_class = await _enroll(site, "gpu-1", site.token(OTHER_CLASS))
    revoked = await _enroll(site, "cam-r", site.token())
    superseded = await _enroll(site, "cam-s", site.token())
    await _enroll(site, "cam-s", site.token(device_name="cam-s"))  # re-admitted: the first certificate is void
    expired = await _expired_current_certificate(site, "cam-x")
    site.fleet.revoke_device("demo", "cam-r")
    site.clock.offset = timedelta(seconds=1)  # past the gateway's identity cache time: the revocation bites
    # The callers' own assignments first, cam-a's last: its revision is above any they hold.
    revisions = Revisions(
        other_device=_assign(site, "cam-b", "0.9.0", MODEL),
        other_class=_assign(site, "gpu-1", "0.8.0", OTHER_MODEL),
        this_device=_assign(site, "cam-a", "1.0.0", MODEL),
    )
    callers: dict[str, Credentials | None] = {
        "device": device,
        "no-client-cert": None,
        "foreign-ca": _foreign_certificate(),
        "expired-cert": expired,
        "non-device-cert": _non_device_certificate(site),
        "superseded-cert": superseded,
        "revoked": revoked,
        "other-device": other,
        "other-class": other_class,
    }
    return callers, revisions


def _own_scope(caller: str, method: str, revisions: Revisions) -> Scope | None:
    """For "own data only" cells: the check that an OK answer is the caller's, never cam-a's."""
    identity = {"other-device": ("demo.cam-b", CLASS), "other-class": ("demo.gpu-1", OTHER_CLASS)}.get(caller)
    if identity is None:
        return None
    if method == "Renew":
        return lambda a: (a.messages[0].device_id, a.messages[0].device_class) == identity
    if method == "WatchAssignments":
        mine = revisions.other_device if caller == "other-device" else revisions.other_class
        return lambda a: [m.revision for m in a.messages] == [mine]
    if method == "ReportHealth":
        return lambda a: True  # checked on the flushed records (cam-a's count unchanged)
    return None


async def _observe(
    site: Site, callers: dict[str, Credentials | None], revisions: Revisions
) -> dict[str, dict[str, str]]:
    observed: dict[str, dict[str, str]] = {method: {} for method in METHODS}
    for number, (caller, credentials) in enumerate(callers.items()):
        async with site.channel(credentials) as channel:
            for method in METHODS[1:]:
                own = _own_scope(caller, method, revisions)
                answer = await _call_method(method, channel, revisions, inferences=100 + number)
                label = _label(answer)
                if answer.code == grpc.StatusCode.OK:
                    assert answer.messages, f"{method} by {caller}: OK without a response"
                    if own is not None:
                        label = OWN if own(answer) else f"LEAK: {answer.messages[:1]}"
                    if method == "FetchTarget":  # the class's own bytes, never another class's
                        assert b"".join(chunk.data for chunk in answer.messages) == CLASS_BYTES
                    if method == "WatchAssignments" and caller == "device":
                        assert [m.revision for m in answer.messages] == [revisions.this_device]
                else:
                    assert not answer.messages, f"{method} by {caller} was refused after sending data"
                if answer.code == grpc.StatusCode.INVALID_ARGUMENT:  # refused for naming cam-a's revision
                    assert "was never assigned to this device" in answer.details, answer.details
                observed[method][caller] = label
    # Another class's target, existing or not, is refused before any lookup: no bytes, no probing.
    async with site.channel(callers["other-class"]) as channel:
        stub = fleet_pb2_grpc.FleetGatewayStub(channel)
        for caller, path in (("other-class", CLASS_TARGET), ("other-class (missing path)", MISSING)):
            answer = await _stream(stub.FetchTarget(fleet_pb2.FetchTargetRequest(target_path=path, max_length=1 << 20)))
            assert not answer.messages
            observed["FetchTarget"][caller] = _label(answer)
    return observed


async def _observe_enroll(site: Site) -> dict[str, str]:
    cells: dict[str, str] = {}
    expiring = site.token(ttl=timedelta(minutes=1))
    used = site.token()
    await _enroll(site, "cam-u", used)
    cases = {
        "valid-token": (site.token(), "cam-new"),
        "no-token": ("", "cam-n1"),
        "unknown-token": ("eft1.0123456789abcdef." + "A" * 43, "cam-n2"),
        "malformed-token": ("not-a-token", "cam-n3"),
        "expired-token": (expiring, "cam-n4"),
        "used-token": (used, "cam-n5"),
        "other-device (its name, unpinned token)": (site.token(), "cam-a"),
        "revoked (its name, unpinned token)": (site.token(), "cam-r"),
    }
    async with site.channel(None, enroll_port=True) as channel:
        stub = fleet_pb2_grpc.FleetGatewayStub(channel)
        for caller, (token, name) in cases.items():
            if caller == "expired-token":
                site.clock.offset += timedelta(minutes=2)
            answer = await _unary(stub.Enroll(_enroll_request(token, name, key_and_csr()[1]), timeout=10))
            if caller == "expired-token":
                site.clock.offset -= timedelta(minutes=2)
            cells[caller] = _label(answer)
    async with site.channel(None) as channel:
        request = _enroll_request(site.token(), "cam-n6", key_and_csr()[1])
        cells["fleet port, no-client-cert"] = _label(
            await _unary(fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(request, timeout=10))
        )
    return cells


@pytest.mark.asyncio
async def test_every_method_refuses_every_caller_it_must(site: Site) -> None:
    callers, revisions = await _callers(site)
    observed = await _observe(site, callers, revisions)
    observed["Enroll"] = await _observe_enroll(site)
    record_matrix("fleet-gateway", observed)
    assert observed == EXPECTED
    # Health reported with another device's certificate counted for that device, never for cam-a.
    await asyncio.to_thread(site.gateway.service.flush_health)
    this_device = site.fleet.read_device_health(CLASS, "demo.cam-a")
    assert this_device is not None
    assert [t.inference_count for t in this_device.totals.values()] == [100]
    # The forged install reports were refused: cam-a has only its own (the control's) report.
    installs = [(name, r.revision, r.reason) for _, name, r in site.fleet.installs("demo")]
    assert installs == [("cam-a", revisions.this_device, "Forged")]


@pytest.mark.asyncio
async def test_the_enrollment_port_serves_only_enroll_and_health(site: Site) -> None:
    device = await _enroll(site, "cam-a", site.token())
    revisions = Revisions(this_device=1, other_device=0, other_class=0)
    observed: dict[str, dict[str, str]] = {method: {} for method in ENROLL_PORT_EXPECTED}
    for caller, credentials in (("no-client-cert", None), ("device-cert presented", device)):
        async with site.channel(credentials, enroll_port=True) as channel:
            for method in METHODS[1:]:
                answer = await _call_method(method, channel, revisions, inferences=1)
                assert not answer.messages, f"{method} answered on the enrollment port"
                observed[method][caller] = _label(answer)
    async with site.channel(None, enroll_port=True) as channel:
        request = _enroll_request(site.token(), "cam-b", key_and_csr()[1])
        observed["Enroll"]["no-client-cert"] = _label(
            await _unary(fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(request, timeout=10))
        )
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        observed["grpc.health.v1.Health/Check"]["no-client-cert"] = OK if check.status == check.SERVING else "?"
    record_matrix("fleet-gateway-enrollment-port", observed)
    assert observed == ENROLL_PORT_EXPECTED
    assert site.fleet.installs("demo") == []


def test_device_local_apis_bind_loopback_and_are_unauthenticated_by_design() -> None:
    """AcceleratorStage (``edgefleet accel-server``) and the agent's Inference API have no TLS or auth.

    By design (accel_server.py, inference_server.py): they serve the device itself, over loopback or
    a Unix socket. The cells below record that, and the test checks the defaults really are loopback
    (a non-loopback ``--listen`` is allowed but logged as a warning).
    """
    assert inspect.signature(accel_cli.serve).parameters["listen"].default == "127.0.0.1:0"
    assert {f.name: f.default for f in dataclasses.fields(AgentSettings)}["inference_listen"] == "127.0.0.1:0"
    for address in ("127.0.0.1:0", "[::1]:9000", "localhost:1", "unix:/run/edgefleet/accel.sock"):
        assert is_local_address(address)
    for address in ("0.0.0.0:0", "192.0.2.7:9000", "[::]:9000"):
        assert not is_local_address(address)
    cells = {
        "AcceleratorStage (accel-server)": {"any local caller": "served: loopback default, no auth by design"},
        "Inference API (agent)": {"any local caller": "served: loopback default, no auth by design"},
    }
    record_matrix("device-local-apis", cells)
