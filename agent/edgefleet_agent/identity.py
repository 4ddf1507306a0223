"""The device's identity: enrollment with a bootstrap token, and the key and certificate kept after it.

The private key is generated here (EC P-256, the only kind the gateway signs and every TLS stack
handshakes with) and never leaves ``STATE/identity/``. Enrollment is the one call made without a
client certificate, over TLS that authenticates the gateway against the CA file the device was
provisioned with. Everything is written atomically and ``identity.json`` last, so a device that
died mid-enrollment simply enrolls again (reusing its key) on the next start.

The bootstrap token is a secret: it is sent once and never logged or written anywhere.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import grpc
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet_agent.connection import DeviceCredentials, rpc_status
from edgefleet_agent.errors import AgentError
from edgefleet_core.atomic import PRIVATE, PUBLIC, write_file_atomic
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

IDENTITY_DIR = "identity"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"
IDENTITY_FILE = "identity.json"
RENEWAL_FILE = "renewal.json"
"""A renewed key and certificate chain written as one file before the separate files are replaced."""
ENROLL_TIMEOUT_S = 30.0
RENEW_AT: Final = 2 / 3
"""Fraction of the certificate's lifetime after which the agent renews it."""
MAX_RENEWAL_BYTES: Final = 1024 * 1024
_CGROUP = Path("/sys/fs/cgroup")


class IdentityError(AgentError):
    """The stored identity is missing pieces or unreadable; the device must enroll again."""


class EnrollmentError(AgentError):
    """Enrollment failed. ``retryable`` is True when the gateway was unreachable (try again later)."""

    def __init__(self, message: str, *, code: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        """The gRPC status code name, e.g. ``UNAUTHENTICATED`` for a refused token."""
        self.retryable = retryable


@dataclass(frozen=True)
class GatewayHints:
    """How the gateway asked the agent to behave (enrollment response); defaults as fleet.proto says."""

    heartbeat_interval: float = 30.0
    """Seconds between health reports."""
    reconnect_backoff_initial: float = 1.0
    """First reconnect delay bound, seconds."""
    reconnect_backoff_max: float = 60.0
    """Largest reconnect delay, seconds."""

    @classmethod
    def from_proto(cls, hints: fleet_pb2.GatewayHints) -> GatewayHints:
        """Unset fields keep the defaults; absurd values are clamped rather than trusted."""
        default = cls()
        heartbeat = _seconds(hints, "heartbeat_interval", default.heartbeat_interval)
        initial = _seconds(hints, "reconnect_backoff_initial", default.reconnect_backoff_initial)
        maximum = _seconds(hints, "reconnect_backoff_max", default.reconnect_backoff_max)
        return cls(
            heartbeat_interval=max(1.0, heartbeat),
            reconnect_backoff_initial=max(0.01, initial),
            reconnect_backoff_max=max(0.01, initial, maximum),
        )


def _seconds(message: fleet_pb2.GatewayHints, name: str, default: float) -> float:
    if not message.HasField(name):  # type: ignore[arg-type]  # field names are checked by the tests
        return default
    value = getattr(message, name).ToTimedelta().total_seconds()
    return float(value) if value > 0 else default


@dataclass(frozen=True)
class DeviceIdentity:
    """Who the gateway says this device is, and the credentials that prove it."""

    device_id: str
    namespace: str
    device_class: str
    name: str
    not_after: datetime
    credentials: DeviceCredentials
    hints: GatewayHints = GatewayHints()
    received_at: datetime | None = None
    """When this device received the certificate (its clock): where its lifetime starts for renewal.
    The certificate's not-before is earlier on purpose (the gateway backdates it for lagging clocks)."""


class _IdentityFile(BaseModel):
    """``identity.json``: everything but the PEM files (stored next to it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str
    namespace: str
    device_class: str
    name: str
    not_after: datetime
    received_at: datetime | None = None
    heartbeat_interval: float = 30.0
    reconnect_backoff_initial: float = 1.0
    reconnect_backoff_max: float = 60.0


class _Renewal(BaseModel):
    """``renewal.json``: a renewed key, chain and CA bundle, complete, kept until copied into place."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_pem: str
    certificate_chain_pem: str
    ca_pem: str
    not_after: datetime
    received_at: datetime | None = None


@dataclass(frozen=True)
class HardwareFacts:
    """What the device measured about itself at start-up (fleet.proto ``HardwareFacts``)."""

    cpu_arch: str
    cpu_cores: int
    cpu_features: tuple[str, ...]
    memory_bytes: int
    execution_providers: tuple[str, ...]
    storage_free_bytes: int

    def to_proto(self) -> fleet_pb2.HardwareFacts:
        return fleet_pb2.HardwareFacts(
            cpu_arch=self.cpu_arch,
            cpu_cores=self.cpu_cores,
            cpu_features=list(self.cpu_features),
            memory_bytes=self.memory_bytes,
            execution_providers=list(self.execution_providers),
            storage_free_bytes=self.storage_free_bytes,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "cpu_arch": self.cpu_arch,
            "cpu_cores": self.cpu_cores,
            "cpu_features": list(self.cpu_features),
            "memory_bytes": self.memory_bytes,
            "execution_providers": list(self.execution_providers),
            "storage_free_bytes": self.storage_free_bytes,
        }


# ------------------------------------------------------------------------------------------------
# Hardware facts


def _cgroup_cpu_limit(cgroup: Path) -> int | None:
    # cgroup v2 "cpu.max" is "<quota> <period>" or "max <period>".
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def _cgroup_memory_limit(cgroup: Path) -> int | None:
    try:
        text = (cgroup / "memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cpu_cores(cgroup: Path = _CGROUP) -> int:
    """Logical cores this process may use: CPU affinity, then the cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup)
    return max(1, min(cores, limit) if limit is not None else cores)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """ISA features as /proc/cpuinfo names them (x86 ``flags``, Arm ``Features``), sorted, unique."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ()
    found: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(word.lower() for word in value.split())
    return tuple(sorted(found))


def memory_bytes(cgroup: Path = _CGROUP) -> int:
    """Physical memory the agent may use: the machine's, or less under a cgroup memory limit."""
    total = int(psutil.virtual_memory().total)
    limit = _cgroup_memory_limit(cgroup)
    return min(total, limit) if limit is not None else total


def measure_hardware(state_dir: Path, execution_providers: Sequence[str]) -> HardwareFacts:
    """Hardware facts for enrollment. ``execution_providers``: what ONNX Runtime can create here."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return HardwareFacts(
        cpu_arch=platform.machine(),
        cpu_cores=cpu_cores(),
        cpu_features=cpu_features(),
        memory_bytes=memory_bytes(),
        execution_providers=tuple(execution_providers),
        storage_free_bytes=shutil.disk_usage(state_dir).free,
    )


# ------------------------------------------------------------------------------------------------
# Stored identity


class IdentityStore:
    """``STATE/identity/``: key (0600), certificate chain, CA bundle and ``identity.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / IDENTITY_DIR

    def enrolled(self) -> bool:
        return (self.directory / IDENTITY_FILE).is_file()

    def load(self) -> DeviceIdentity | None:
        """The stored identity, ``None`` before enrollment; :class:`IdentityError` if it is damaged."""
        if not self.enrolled():
            return None
        self._finish_renewal()
        try:
            facts = _IdentityFile.model_validate_json((self.directory / IDENTITY_FILE).read_bytes())
            credentials = DeviceCredentials(
                key_pem=(self.directory / KEY_FILE).read_bytes(),
                certificate_chain_pem=(self.directory / CERT_FILE).read_bytes(),
                ca_pem=(self.directory / CA_FILE).read_bytes(),
            )
        except (OSError, ValidationError) as e:
            raise IdentityError(f"stored identity in {self.directory} is unusable: {e}") from e
        return DeviceIdentity(
            device_id=facts.device_id,
            namespace=facts.namespace,
            device_class=facts.device_class,
            name=facts.name,
            not_after=facts.not_after,
            received_at=facts.received_at,
            credentials=credentials,
            hints=GatewayHints(
                heartbeat_interval=facts.heartbeat_interval,
                reconnect_backoff_initial=facts.reconnect_backoff_initial,
                reconnect_backoff_max=facts.reconnect_backoff_max,
            ),
        )

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The device key, created (0600) on first use and reused until enrollment succeeds.

        Reusing it means an enrollment retried after a crash asks for a certificate on the same key.
        """
        path = self.directory / KEY_FILE
        if path.is_file():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as e:
                raise IdentityError(f"device key {path} is unreadable: {e}") from e
            if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
                return key
            logger.warning("device key %s is not EC P-256; generating a new one", path)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_file_atomic(path, pem, mode=PRIVATE)
        return key

    def save_renewed(self, identity: DeviceIdentity) -> None:
        """Persist a renewed identity so that a crash at any point leaves the old pair or the new one.

        The new key, chain and CA are first written together as one file (atomically, 0600): once
        it exists the renewal is durable, and :meth:`load` finishes replacing the separate files
        from it if the process dies before :meth:`save` completes. A crash before it exists leaves
        the old files untouched.
        """
        creds = identity.credentials
        journal = _Renewal(
            key_pem=creds.key_pem.decode(),
            certificate_chain_pem=creds.certificate_chain_pem.decode(),
            ca_pem=creds.ca_pem.decode(),
            not_after=identity.not_after,
            received_at=identity.received_at,
        )
        write_file_atomic(self.directory / RENEWAL_FILE, journal.model_dump_json().encode(), mode=PRIVATE)
        self.save(identity)
        (self.directory / RENEWAL_FILE).unlink(missing_ok=True)

    def _finish_renewal(self) -> None:
        """Roll a renewal that was persisted but not yet copied into the separate files forward."""
        path = self.directory / RENEWAL_FILE
        try:
            if not path.is_file():
                return
            if path.stat().st_size > MAX_RENEWAL_BYTES:
                raise ValueError(f"over {MAX_RENEWAL_BYTES} bytes")
            renewal = _Renewal.model_validate_json(path.read_bytes())
            facts = _IdentityFile.model_validate_json((self.directory / IDENTITY_FILE).read_bytes())
            key = serialization.load_pem_private_key(renewal.key_pem.encode(), password=None)
            leaf = x509.load_pem_x509_certificates(renewal.certificate_chain_pem.encode())[0]
            if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
                raise ValueError("its key does not match its certificate")
        except (OSError, ValueError, ValidationError) as e:
            # Written atomically, so this is not a half-written file: the old pair stays in use.
            logger.error("renewed identity %s is unusable (%s); keeping the previous certificate", path, e)
            path.unlink(missing_ok=True)
            return
        logger.warning("finishing a certificate renewal interrupted by a restart")
        write_file_atomic(self.directory / KEY_FILE, renewal.key_pem.encode(), mode=PRIVATE)
        write_file_atomic(self.directory / CERT_FILE, renewal.certificate_chain_pem.encode(), mode=PUBLIC)
        write_file_atomic(self.directory / CA_FILE, renewal.ca_pem.encode(), mode=PUBLIC)
        updated = facts.model_copy(update={"not_after": renewal.not_after, "received_at": renewal.received_at})
        write_file_atomic(self.directory / IDENTITY_FILE, updated.model_dump_json(indent=2).encode() + b"\n")
        path.unlink(missing_ok=True)

    def save(self, identity: DeviceIdentity) -> None:
        """Persist every file, ``identity.json`` last (its presence means "enrolled")."""
        creds = identity.credentials
        write_file_atomic(self.directory / KEY_FILE, creds.key_pem, mode=PRIVATE)
        write_file_atomic(self.directory / CERT_FILE, creds.certificate_chain_pem, mode=PUBLIC)
        write_file_atomic(self.directory / CA_FILE, creds.ca_pem, mode=PUBLIC)
        facts = _IdentityFile(
            device_id=identity.device_id,
            namespace=identity.namespace,
            device_class=identity.device_class,
            name=identity.name,
            not_after=identity.not_after,
            received_at=identity.received_at,
            heartbeat_interval=identity.hints.heartbeat_interval,
            reconnect_backoff_initial=identity.hints.reconnect_backoff_initial,
            reconnect_backoff_max=identity.hints.reconnect_backoff_max,
        )
        write_file_atomic(self.directory / IDENTITY_FILE, facts.model_dump_json(indent=2).encode() + b"\n")


def certificate_signing_request(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM CSR for ``key``. The gateway writes subject and SANs itself; the CN here is a courtesy."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def read_token(token: str | None, token_file: Path | None, *, enrolled: bool = False) -> str | None:
    """The bootstrap token from ``--token`` or the first line of ``--token-file`` (not both).

    ``enrolled``: the device already has an identity, so the token is not needed, and a token file
    that is gone or empty (a one-time systemd credential, a Secret removed after enrollment) is
    no error.
    """
    if token is not None and token_file is not None:
        raise ValueError("give --token or --token-file, not both")
    if token is not None:
        # A token from a Secret made with --from-file (or `echo` into an env file) carries a newline.
        token = token.strip() or None
        if token is None and not enrolled:
            raise ValueError("the token given is empty")
    if token_file is not None:
        if enrolled and not token_file.exists():
            return None
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the token file {token_file}: {e.strerror}") from e
        if not token:
            if enrolled:
                return None
            raise ValueError(f"the token file {token_file} is empty")
    return token


def enroll(
    state_dir: Path,
    *,
    target: str,
    gateway_ca_pem: bytes,
    token: str,
    name: str,
    labels: Mapping[str, str],
    hardware: HardwareFacts,
    agent_version: str,
    timeout: float = ENROLL_TIMEOUT_S,
) -> DeviceIdentity:
    """Exchange ``token`` and a CSR for a device certificate at the enrollment port ``target``; persist it.

    :class:`EnrollmentError` with ``retryable`` for an unreachable gateway, without it for a refusal
    (bad, used or expired token: ``UNAUTHENTICATED``; bad request: ``INVALID_ARGUMENT``).
    """
    store = IdentityStore(state_dir)
    key = store.private_key()
    request = fleet_pb2.EnrollRequest(
        bootstrap_token=token,
        csr_pem=certificate_signing_request(key, name).decode(),
        device_name=name,
        labels=dict(labels),
        hardware=hardware.to_proto(),
        agent_version=agent_version,
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=gateway_ca_pem)
    try:
        with grpc.secure_channel(target, credentials) as channel:
            response = fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(request, timeout=timeout)
    except grpc.RpcError as e:
        code, details = rpc_status(e)
        retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # The details come from the gateway (or gRPC) and never echo the token.
        raise EnrollmentError(
            f"enrollment at {target} failed: {code.name}: {details}", code=code.name, retryable=retryable
        ) from e
    identity = _identity_from_response(response, key, gateway_ca_pem)
    store.save(identity)
    logger.info(
        "enrolled as %s (class %s), certificate valid until %s",
        identity.device_id,
        identity.device_class,
        identity.not_after.isoformat(),
    )
    return identity


def _identity_from_response(
    response: fleet_pb2.EnrollResponse, key: ec.EllipticCurvePrivateKey, gateway_ca_pem: bytes
) -> DeviceIdentity:
    if not (response.device_id and response.namespace and response.device_class and response.certificate_chain_pem):
        raise EnrollmentError("the gateway's enrollment response is incomplete", code="OK", retryable=False)
    chain = response.certificate_chain_pem.encode()
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as e:
        raise EnrollmentError(f"the gateway returned an unreadable certificate: {e}", code="OK", retryable=False) from e
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise EnrollmentError("the gateway's certificate is not for this device's key", code="OK", retryable=False)
    not_after = leaf.not_valid_after_utc
    if response.HasField("certificate_not_after"):
        not_after = response.certificate_not_after.ToDatetime(tzinfo=UTC)
    _, _, name = response.device_id.partition(".")
    return DeviceIdentity(
        device_id=response.device_id,
        namespace=response.namespace,
        device_class=response.device_class,
        name=name or response.device_id,
        not_after=not_after,
        received_at=datetime.now(UTC),
        credentials=DeviceCredentials(
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            certificate_chain_pem=chain,
            # An empty bundle keeps the CA the device was provisioned with.
            ca_pem=response.ca_bundle_pem.encode() or gateway_ca_pem,
        ),
        hints=GatewayHints.from_proto(response.hints),
    )


def renewal_due(identity: DeviceIdentity) -> datetime:
    """When to renew: :data:`RENEW_AT` of the way from when the certificate was received to its not-after.

    Not from its not-before: the gateway backdates that (``CLOCK_SKEW``, 5 minutes) so that devices
    whose clocks lag accept it, and counting the backdating in made a certificate of a few minutes'
    lifetime due at once, renewed into another one due at once (identities stored before
    ``received_at`` existed still count from the not-before).
    """
    try:
        leaf = x509.load_pem_x509_certificates(identity.credentials.certificate_chain_pem)[0]
        start = leaf.not_valid_before_utc
    except ValueError:
        return identity.not_after  # unreadable here; the TLS handshake will say more
    if identity.received_at is not None:
        start = max(start, min(identity.received_at, identity.not_after))
    return start + (identity.not_after - start) * RENEW_AT


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 device key (renewal never reuses the old one)."""
    return ec.generate_private_key(ec.SECP256R1())


def renewed_identity(
    response: fleet_pb2.EnrollResponse, key: ec.EllipticCurvePrivateKey, current: DeviceIdentity
) -> DeviceIdentity:
    """The identity a Renew response gives (checked like an enrollment's: complete, for ``key``)."""
    renewed = _identity_from_response(response, key, current.credentials.ca_pem)
    if renewed.device_id != current.device_id:
        raise EnrollmentError(
            f"the gateway renewed the certificate for {renewed.device_id}, not {current.device_id}",
            code="OK",
            retryable=False,
        )
    # Renew carries no hints of its own worth trusting over the stored ones unless set.
    hints = renewed.hints if response.HasField("hints") else current.hints
    return DeviceIdentity(
        device_id=current.device_id,
        namespace=current.namespace,
        device_class=current.device_class,
        name=current.name,
        not_after=renewed.not_after,
        received_at=renewed.received_at,
        credentials=renewed.credentials,
        hints=hints,
    )


def describe(identity: DeviceIdentity) -> dict[str, object]:
    """What ``edgefleet agent status`` shows (no key material)."""
    return {
        "device_id": identity.device_id,
        "namespace": identity.namespace,
        "device_class": identity.device_class,
        "name": identity.name,
        "certificate_not_after": identity.not_after.isoformat(),
        "certificate_expired": identity.not_after <= datetime.now(UTC),
    }
