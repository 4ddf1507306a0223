"""A stand-in for the fleet gateway at the agent's own seam: the FleetGateway service over real mTLS.

Test PKI (EC P-256 CA, server and client certificates made with cryptography) and a grpc.aio
servicer that serves TUF files from a dict, records every request, and injects faults: a stream
dropped mid-file, a corrupted chunk, endless data, unavailable reports. The real gateway has its
own tests; the agent's integration tests run against it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio

from edgefleet_agent.connection import DeviceCredentials
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

TOKEN = "eft1.0123456789abcdef.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class FleetPki:
    """A fleet CA with a server certificate for localhost/127.0.0.1 and a way to issue device certificates."""

    def __init__(self, common_name: str = "test fleet CA") -> None:
        now = datetime.now(UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_pem = self._issue(
            self.server_key.public_key(),
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        validity: timedelta = timedelta(days=1),
    ) -> bytes:
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + validity)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_pem: bytes, device_id: str, validity: timedelta = timedelta(days=1)) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return self._issue(
            public_key,
            device_id,
            [x509.UniformResourceIdentifier(f"urn:test:{device_id}")],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            validity,
        )

    def device_credentials(self, device_id: str = "default.dev-1") -> DeviceCredentials:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            key.public_key(),
            device_id,
            [x509.UniformResourceIdentifier(f"urn:test:{device_id}")],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return DeviceCredentials(key_pem=_pem_key(key), certificate_chain_pem=cert, ca_pem=self.ca_pem)


@dataclass
class Faults:
    """What the fake gateway does wrong, per repository path (``metadata/…``, ``targets/…``)."""

    drop_after: dict[str, int] = field(default_factory=dict)
    """End the stream with UNAVAILABLE after this many bytes of the file (first request only)."""
    corrupt_once: set[str] = field(default_factory=set)
    """Flip a byte in the first chunk of the first request."""
    corrupt_always: set[str] = field(default_factory=set)
    endless: set[str] = field(default_factory=set)
    """Announce the file as max_length long, then send data without end."""
    no_eof: set[str] = field(default_factory=set)
    """End the stream OK, without the eof chunk, after the first chunk (first request only)."""
    report_install_failures: int = 0
    """ReportInstall answers UNAVAILABLE this many times first."""
    stall_after: dict[str, int] = field(default_factory=dict)
    """Stop sending (without ending the stream) after this many bytes of the file (first request only)."""
    empty_chunks: set[str] = field(default_factory=set)
    """Send empty chunks that are not the eof chunk, without end."""
    renew_failures: int = 0
    """Renew answers UNAVAILABLE this many times first."""


@dataclass(frozen=True)
class FetchCall:
    method: str
    path: str
    offset: int
    max_length: int


class FakeGateway(fleet_pb2_grpc.FleetGatewayServicer):
    def __init__(self, pki: FleetPki, files: dict[str, bytes] | None = None, *, chunk_bytes: int = 1000) -> None:
        self.pki = pki
        self.files = dict(files or {})
        self.chunk_bytes = chunk_bytes
        self.faults = Faults()
        self.fetches: list[FetchCall] = []
        self.enrolls: list[fleet_pb2.EnrollRequest] = []
        self.watches: list[fleet_pb2.WatchAssignmentsRequest] = []
        self.health: list[fleet_pb2.HealthReport] = []
        self.installs: list[fleet_pb2.InstallReport] = []
        self.assignments: list[fleet_pb2.Assignment] = []
        self.new_assignment = asyncio.Event()
        self.next_interval: float | None = None
        self.health_failures = 0
        """ReportHealth calls still to refuse with UNAVAILABLE (a gateway that cannot take them now)."""
        self.namespace = "default"
        self.device_class = "cpu-small"
        self.hints = fleet_pb2.GatewayHints()
        self.enroll_validity = timedelta(days=1)
        """Lifetime of certificates issued by Enroll (they start a minute in the past)."""
        self.renew_validity = timedelta(days=1)
        self.renewals: list[fleet_pb2.RenewRequest] = []
        self.issued: list[bytes] = []
        """Every certificate issued (Enroll and Renew), in order."""
        self.peers: list[str] = []
        """Common name of the client certificate of each WatchAssignments call."""

    def push(self, assignment: fleet_pb2.Assignment) -> None:
        self.assignments.append(assignment)
        self.new_assignment.set()

    async def Enroll(
        self, request: fleet_pb2.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.EnrollResponse:
        self.enrolls.append(request)
        if request.bootstrap_token != TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bootstrap token refused")
        device_id = f"{self.namespace}.{request.device_name}"
        return self._issued(request.csr_pem, device_id, self.enroll_validity)

    def _issued(self, csr_pem: str, device_id: str, validity: timedelta) -> fleet_pb2.EnrollResponse:
        certificate = self.pki.sign_csr(csr_pem.encode(), device_id, validity)
        self.issued.append(certificate)
        response = fleet_pb2.EnrollResponse(
            certificate_chain_pem=certificate.decode(),
            ca_bundle_pem=self.pki.ca_pem.decode(),
            device_id=device_id,
            namespace=self.namespace,
            device_class=self.device_class,
            hints=self.hints,
        )
        response.certificate_not_after.FromDatetime(x509.load_pem_x509_certificate(certificate).not_valid_after_utc)
        return response

    async def Renew(
        self, request: fleet_pb2.RenewRequest, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.EnrollResponse:
        device_id = _peer_name(context)
        if not device_id:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if self.faults.renew_failures > 0:
            self.faults.renew_failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        self.renewals.append(request)
        return self._issued(request.csr_pem, device_id, self.renew_validity)

    async def WatchAssignments(
        self, request: fleet_pb2.WatchAssignmentsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb2.Assignment]:
        self.watches.append(request)
        self.peers.append(_peer_name(context))
        sent = 0
        while True:
            for assignment in self.assignments[sent:]:
                sent += 1
                if assignment.revision > request.last_revision:
                    yield assignment
            self.new_assignment.clear()
            if sent < len(self.assignments):
                continue
            await self.new_assignment.wait()

    async def ReportHealth(
        self, request: fleet_pb2.HealthReport, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.HealthAck:
        if self.health_failures > 0:
            self.health_failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        self.health.append(request)
        ack = fleet_pb2.HealthAck()
        if self.next_interval is not None:
            ack.next_interval.FromTimedelta(timedelta(seconds=self.next_interval))
        return ack

    async def ReportInstall(
        self, request: fleet_pb2.InstallReport, context: aio.ServicerContext[Any, Any]
    ) -> fleet_pb2.InstallAck:
        if self.faults.report_install_failures > 0:
            self.faults.report_install_failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        self.installs.append(request)
        return fleet_pb2.InstallAck()

    async def FetchMetadata(
        self, request: fleet_pb2.FetchMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        name = f"{request.version}.{request.role}.json" if request.version else f"{request.role}.json"
        async for chunk in self._serve(
            "FetchMetadata", f"metadata/{name}", request.offset, request.max_length, context
        ):
            yield chunk

    async def FetchTarget(
        self, request: fleet_pb2.FetchTargetRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        async for chunk in self._serve(
            "FetchTarget", f"targets/{request.target_path}", request.offset, request.max_length, context
        ):
            yield chunk

    async def _serve(
        self, method: str, path: str, offset: int, max_length: int, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fleet_pb2.Chunk]:
        first = not any(call.path == path for call in self.fetches)
        self.fetches.append(FetchCall(method, path, offset, max_length))
        if path in self.faults.empty_chunks or path in self.faults.endless:
            async for chunk in self._junk(path, offset, max_length):
                yield chunk
        data = self.files.get(path)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{path} not found")
        if offset > len(data):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {offset} beyond {len(data)}")
        if len(data) > max_length:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{path} is {len(data)} bytes")
        position = offset
        while True:
            piece = data[position : position + self.chunk_bytes]
            drop = self.faults.drop_after.get(path)
            if first and drop is not None and position >= drop:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway going away")
            stall = self.faults.stall_after.get(path)
            if first and stall is not None and position >= stall:
                await asyncio.Event().wait()  # hangs without closing: until the client cancels
            if piece and ((first and path in self.faults.corrupt_once) or path in self.faults.corrupt_always):
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
                first = first and path not in self.faults.corrupt_once
            end = position + len(piece)
            eof = end == len(data)
            yield fleet_pb2.Chunk(offset=position, data=piece, total_length=len(data), eof=eof)
            if eof:
                return
            if first and path in self.faults.no_eof:
                return
            position = end

    async def _junk(self, path: str, offset: int, max_length: int) -> AsyncIterator[fleet_pb2.Chunk]:
        """Chunks without end: empty ones (``empty_chunks``) or data past any limit (``endless``)."""
        step = 0 if path in self.faults.empty_chunks else self.chunk_bytes
        position = offset
        while True:
            yield fleet_pb2.Chunk(offset=position, data=b"x" * step, total_length=max_length)
            position += step
            await asyncio.sleep(0)


def _peer_name(context: aio.ServicerContext[Any, Any]) -> str:
    names = list(context.auth_context().get("x509_common_name", []))
    return names[0].decode() if names else ""


@dataclass
class RunningGateway:
    gateway: FakeGateway
    server: aio.Server
    fleet: str
    """HOST:PORT of the mTLS port."""
    enroll: str
    """HOST:PORT of the server-authenticated port."""


async def start_gateway(gateway: FakeGateway) -> RunningGateway:
    server = aio.server()
    fleet_pb2_grpc.add_FleetGatewayServicer_to_server(gateway, server)
    pair = [(_pem_key(gateway.pki.server_key), gateway.pki.server_pem)]
    fleet_port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials(pair, root_certificates=gateway.pki.ca_pem, require_client_auth=True)
    )
    enroll_port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
    await server.start()
    return RunningGateway(gateway, server, f"127.0.0.1:{fleet_port}", f"127.0.0.1:{enroll_port}")
