"""The fleet CA: EC P-256 certificates for the gateway (server) and for every device (client).

Identity lives in the device certificate, so no request after enrollment names its device: subject
CN = device id = ``<namespace>.<name>`` and one SAN URI
``urn:edgefleet:device:<namespace>:<device-class>:<name>``. The gateway writes both itself from the
bootstrap token; whatever subject or extensions a CSR asks for are ignored. Only EC P-256 keys:
gRPC's TLS stack (BoringSSL) handshakes with them everywhere, Ed25519 client certificates fail.

Files in a PKI folder: ``ca.pem``, ``ca-key.pem`` (0600), ``server.pem``, ``server-key.pem`` (0600).
The cryptography is the ``cryptography`` library's; what is ours is the profile.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet_core.atomic import PRIVATE, PUBLIC, write_file_atomic
from edgefleet_core.errors import EdgeFleetError

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca-key.pem"
SERVER_CERT: Final = "server.pem"
SERVER_KEY: Final = "server-key.pem"
MAX_CSR_BYTES: Final = 8 * 1024
"""Largest CSR accepted (fleet.proto: at most 8 KiB); a P-256 CSR is well under 1 KiB."""
MAX_PEM_FILE_BYTES: Final = 64 * 1024
DEVICE_URN_PREFIX: Final = "urn:edgefleet:device:"
CLOCK_SKEW: Final = timedelta(minutes=5)
"""Certificates start this long before they are issued, so a device whose clock lags still accepts them."""

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DEVICE_URN = re.compile(rf"^{re.escape(DEVICE_URN_PREFIX)}([^:]+):([^:]+):([^:]+)$")


class PkiError(EdgeFleetError):
    """The PKI folder or a certificate cannot be created, loaded or used."""


class CsrRefused(PkiError):
    """A device's certificate signing request is refused (wrong key type, bad signature, too big, not a CSR)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a device certificate says its holder is."""

    device_id: str
    namespace: str
    device_class: str
    name: str
    serial: str
    """The certificate's serial number, lowercase hex without leading zeros."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate just issued."""

    certificate_pem: bytes
    serial: str
    """Lowercase hex, as :attr:`DeviceIdentity.serial`."""
    not_after: datetime


@dataclass(frozen=True)
class PkiFiles:
    """What the gateway's TLS listeners need: trust anchor, server certificate and key (PEM)."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def device_urn(namespace: str, device_class: str, name: str) -> str:
    """The SAN URI of a device certificate."""
    return f"{DEVICE_URN_PREFIX}{namespace}:{device_class}:{name}"


def _check_names(namespace: str, device_class: str, name: str) -> None:
    if not _LABEL.fullmatch(namespace):
        raise PkiError(f"namespace {namespace!r} is not a DNS-1123 label")
    if not _LABEL.fullmatch(name):
        raise PkiError(f"device name {name!r} is not a DNS-1123 label")
    if len(device_class) > 253 or not _SUBDOMAIN.fullmatch(device_class):
        raise PkiError(f"device class {device_class!r} is not a DNS-1123 subdomain")


@contextlib.contextmanager
def _long_common_names() -> Iterator[None]:
    """Quiet cryptography's warning about a CN over 64 characters, and only that warning.

    X.509's 64-character CN bound is advice TLS stacks do not enforce; a device id of two DNS labels
    may reach 127 characters, and the SAN URI carries the identity either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)
        yield


def _read_pem(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PEM_FILE_BYTES:
            raise PkiError(f"{path} is {size} bytes, too big for a PEM certificate or key")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise PkiError(f"{path} is missing; create the PKI folder with `edgefleet gateway pki init`") from e
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e}") from e


def _load_cert(data: bytes, source: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PkiError(f"{source} is not a PEM certificate: {e}") from e


def _load_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise PkiError(f"{source} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
        raise PkiError(f"{source} is not an EC P-256 private key")
    return key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        cert.public_key().public_bytes(serialization.Encoding.DER, spki)
        == key.public_key().public_bytes(serialization.Encoding.DER, spki)
    )


class FleetCA:
    """The fleet's certificate authority: one EC P-256 key and its self-signed certificate."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if not _same_public_key(certificate, key):
            raise PkiError("the CA certificate and the CA key do not belong together")
        self._certificate = certificate
        self._key = key

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate: the trust anchor devices and the gateway verify each other against."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @classmethod
    def create(
        cls,
        *,
        common_name: str = "EdgeFleet fleet CA",
        validity: timedelta = timedelta(days=3650),
        now: datetime | None = None,
    ) -> FleetCA:
        """A new CA with a fresh key."""
        now = now or _utc_now()
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            # path_length=0: the fleet CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        """The CA saved in ``directory`` (``ca.pem`` and ``ca-key.pem``)."""
        certificate = _load_cert(_read_pem(directory / CA_CERT), str(directory / CA_CERT))
        key = _load_key(_read_pem(directory / CA_KEY), str(directory / CA_KEY))
        return cls(certificate, key)

    def save(self, directory: Path) -> None:
        """Write ``ca.pem`` and ``ca-key.pem`` (0600), each atomically; the key last."""
        write_file_atomic(directory / CA_CERT, self.certificate_pem, mode=PUBLIC)
        write_file_atomic(directory / CA_KEY, _key_pem(self._key), mode=PRIVATE)

    def _leaf(
        self, subject: x509.Name, public: ec.EllipticCurvePublicKey, validity: timedelta, now: datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )

    def issue_server_certificate(
        self, hosts: Sequence[str], *, validity: timedelta = timedelta(days=365), now: datetime | None = None
    ) -> tuple[bytes, bytes]:
        """A gateway server certificate for ``hosts`` (DNS names and IP addresses): (cert PEM, key PEM)."""
        if not hosts:
            raise PkiError("a server certificate needs at least one host name or IP address")
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not _SUBDOMAIN.fullmatch(host.lower()) or len(host) > 253:
                    raise PkiError(f"{host!r} is neither an IP address nor a DNS name") from None
                names.append(x509.DNSName(host.lower()))
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgeFleet gateway")])
        certificate = (
            self._leaf(subject, key.public_key(), validity, now or _utc_now())
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def sign_device_csr(
        self,
        csr_pem: bytes,
        *,
        namespace: str,
        device_class: str,
        name: str,
        validity: timedelta = timedelta(days=30),
        now: datetime | None = None,
    ) -> IssuedCertificate:
        """A device certificate for the key in ``csr_pem``, with the identity given (not the CSR's)."""
        _check_names(namespace, device_class, name)
        public = _csr_public_key(csr_pem)
        device_id = f"{namespace}.{name}"
        with _long_common_names():
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id, _validate=False)])
        certificate = (
            self._leaf(subject, public, validity, now or _utc_now())
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(device_urn(namespace, device_class, name))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            serial=_serial_hex(certificate.serial_number),
            not_after=certificate.not_valid_after_utc,
        )


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRefused(f"CSR is {len(csr_pem)} bytes, over the limit of {MAX_CSR_BYTES}")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in csr_pem:
        raise CsrRefused("not a PEM certificate signing request (no BEGIN CERTIFICATE REQUEST block)")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as e:
        raise CsrRefused(f"CSR cannot be parsed: {e}") from e
    if not isinstance(public, ec.EllipticCurvePublicKey) or not _is_p256(public):
        kind = type(public).__name__.removeprefix("_").replace("PublicKey", "")
        detail = f"EC {public.curve.name}" if isinstance(public, ec.EllipticCurvePublicKey) else kind
        raise CsrRefused(f"CSR key is {detail}; only EC P-256 (secp256r1) keys are accepted")
    if not signed:
        raise CsrRefused("CSR signature does not verify with its own key (not signed by the key it carries)")
    return public


def identity_from_certificate(pem_or_der: bytes) -> DeviceIdentity:
    """The identity a device certificate carries; :class:`ValueError` if it is not a device certificate.

    Parses only: the TLS handshake already verified the chain against the fleet CA.
    """
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            certificate = x509.load_pem_x509_certificate(pem_or_der)
        else:
            certificate = x509.load_der_x509_certificate(pem_or_der)
    except ValueError as e:
        raise ValueError(f"not an X.509 certificate: {e}") from e
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subject alternative names; not a device certificate") from None
    urns = [
        uri for uri in sans.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(DEVICE_URN_PREFIX)
    ]
    if len(urns) != 1:
        raise ValueError(f"certificate has {len(urns)} device URIs ({DEVICE_URN_PREFIX}...), not exactly one")
    match = _DEVICE_URN.fullmatch(urns[0])
    if match is None:
        raise ValueError(f"device URI {urns[0]!r} is not {DEVICE_URN_PREFIX}<namespace>:<class>:<name>")
    namespace, device_class, name = match.groups()
    try:
        _check_names(namespace, device_class, name)
    except PkiError as e:
        raise ValueError(f"device URI {urns[0]!r}: {e}") from None
    with _long_common_names():
        common_names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    device_id = f"{namespace}.{name}"
    if common_names != [device_id]:
        raise ValueError(f"certificate subject CN {common_names!r} does not match its device URI ({device_id!r})")
    return DeviceIdentity(
        device_id=device_id,
        namespace=namespace,
        device_class=device_class,
        name=name,
        serial=_serial_hex(certificate.serial_number),
    )


def init_pki(directory: Path, hosts: Sequence[str]) -> None:
    """Create a CA and a server certificate for ``hosts`` in ``directory``; refuses to replace a CA.

    Server files are written first and the CA last, so a run cut short leaves no CA behind and can
    simply be repeated.
    """
    for existing in (CA_CERT, CA_KEY):
        if (directory / existing).exists():
            raise PkiError(f"{directory / existing} exists; refusing to replace the fleet CA (devices trust it)")
    ca = FleetCA.create()
    cert_pem, key_pem = ca.issue_server_certificate(hosts)
    write_file_atomic(directory / SERVER_CERT, cert_pem, mode=PUBLIC)
    write_file_atomic(directory / SERVER_KEY, key_pem, mode=PRIVATE)
    ca.save(directory)


def renew_server_certificate(
    directory: Path, hosts: Sequence[str], *, validity: timedelta = timedelta(days=365)
) -> None:
    """Issue the gateway a new server certificate and key from the CA in ``directory``.

    The CA stays: devices keep trusting it, so renewing (or adding a host name) needs no change on
    any device. The key is written before the certificate, and each atomically, so a run cut short
    leaves the old pair or a key the next run replaces: ``load_pki`` refuses a mismatched pair.
    """
    ca = FleetCA.load(directory)
    cert_pem, key_pem = ca.issue_server_certificate(hosts, validity=validity)
    write_file_atomic(directory / SERVER_KEY, key_pem, mode=PRIVATE)
    write_file_atomic(directory / SERVER_CERT, cert_pem, mode=PUBLIC)


def load_pki(directory: Path) -> PkiFiles:
    """The gateway's TLS material from ``directory``, checked to belong together."""
    ca_pem = _read_pem(directory / CA_CERT)
    server_cert_pem = _read_pem(directory / SERVER_CERT)
    server_key_pem = _read_pem(directory / SERVER_KEY)
    ca = _load_cert(ca_pem, str(directory / CA_CERT))
    server = _load_cert(server_cert_pem, str(directory / SERVER_CERT))
    key = _load_key(server_key_pem, str(directory / SERVER_KEY))
    if not _same_public_key(server, key):
        raise PkiError(f"{directory / SERVER_KEY} is not the key of {directory / SERVER_CERT}")
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PkiError(f"{directory / SERVER_CERT} was not issued by {directory / CA_CERT}: {e}") from e
    return PkiFiles(ca_pem=ca_pem, server_cert_pem=server_cert_pem, server_key_pem=server_key_pem)


def pki_secret_files(directory: Path) -> dict[str, bytes]:
    """The four PKI files of ``directory`` for a Kubernetes Secret, checked to belong together first.

    The gateway signs device certificates with the CA key, so a Secret with a CA key that is not
    the CA certificate's, or a server certificate from another CA, would fail only at enrollment.
    """
    files = load_pki(directory)
    ca_key_pem = _read_pem(directory / CA_KEY)
    ca_key = _load_key(ca_key_pem, str(directory / CA_KEY))
    if not _same_public_key(_load_cert(files.ca_pem, str(directory / CA_CERT)), ca_key):
        raise PkiError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
    return {
        CA_CERT: files.ca_pem,
        CA_KEY: ca_key_pem,
        SERVER_CERT: files.server_cert_pem,
        SERVER_KEY: files.server_key_pem,
    }
