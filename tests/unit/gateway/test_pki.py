"""The fleet CA: device certificates from CSRs, identities, the PKI folder, and real TLS handshakes with grpc."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet_operator.gateway.pki import (
    CA_CERT,
    CA_KEY,
    MAX_CSR_BYTES,
    SERVER_CERT,
    SERVER_KEY,
    CsrRefused,
    DeviceIdentity,
    FleetCA,
    PkiError,
    identity_from_certificate,
    init_pki,
    load_pki,
    pki_secret_files,
    renew_server_certificate,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_PEM = serialization.Encoding.PEM


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey, **san: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.admin")])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san["uri"])]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(_PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create(now=NOW)


# ------------------------------------------------------------------------------ device certificates


def test_a_device_certificate_carries_the_identity_the_gateway_chose(ca: FleetCA) -> None:
    csr = _csr(_p256(), uri="urn:edgefleet:device:kube-system:gpu:admin")
    issued = ca.sign_device_csr(csr, namespace="factory", device_class="cpu-small", name="cam-1", now=NOW)
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    certificate.verify_directly_issued_by(ca.certificate)
    assert certificate.subject.rfc4514_string() == "CN=factory.cam-1"  # the CSR's subject is ignored
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edgefleet:device:factory:cpu-small:cam-1"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.not_after == NOW + timedelta(days=30) == certificate.not_valid_after_utc
    assert issued.serial == format(certificate.serial_number, "x")
    assert identity_from_certificate(issued.certificate_pem) == DeviceIdentity(
        device_id="factory.cam-1", namespace="factory", device_class="cpu-small", name="cam-1", serial=issued.serial
    )
    assert identity_from_certificate(certificate.public_bytes(serialization.Encoding.DER)).serial == issued.serial


def test_validity_is_configurable_and_serials_differ(ca: FleetCA) -> None:
    one = ca.sign_device_csr(
        _csr(_p256()), namespace="a", device_class="b", name="c", validity=timedelta(hours=1), now=NOW
    )
    two = ca.sign_device_csr(_csr(_p256()), namespace="a", device_class="b", name="c", now=NOW)
    assert one.not_after == NOW + timedelta(hours=1)
    assert one.serial != two.serial


def test_the_longest_device_ids_work(ca: FleetCA) -> None:
    # Two 63-character labels: a 127-character CN, over X.509's advisory 64 (and no warning escapes).
    namespace, name = "n" * 63, "d" * 63
    issued = ca.sign_device_csr(_csr(_p256()), namespace=namespace, device_class="x.y", name=name, now=NOW)
    identity = identity_from_certificate(issued.certificate_pem)
    assert identity.device_id == f"{namespace}.{name}"
    assert len(identity.device_id) == 127


@pytest.mark.parametrize(
    ("make_key", "kind"),
    [
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "EC secp384r1"),
    ],
)
def test_only_p256_keys_are_accepted(ca: FleetCA, make_key: Callable[[], object], kind: str) -> None:
    with pytest.raises(CsrRefused, match=f"CSR key is {kind}; only EC P-256"):
        ca.sign_device_csr(_csr(make_key()), namespace="a", device_class="b", name="c")  # type: ignore[arg-type]


def _with_bad_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature's S integer: still parses, no longer verifies
    return x509.load_der_x509_csr(bytes(der)).public_bytes(_PEM)


@pytest.mark.parametrize(
    ("csr", "problem"),
    [
        (b"", "not a PEM certificate signing request"),
        (b"garbage \x00\xff", "not a PEM certificate signing request"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "cannot be parsed"),
        (b"-----BEGIN CERTIFICATE REQUEST-----" + b"A" * MAX_CSR_BYTES, "over the limit of 8192"),
    ],
)
def test_garbage_is_refused_clearly(ca: FleetCA, csr: bytes, problem: str) -> None:
    with pytest.raises(CsrRefused, match=problem):
        ca.sign_device_csr(csr, namespace="a", device_class="b", name="c")


def test_a_csr_not_signed_by_its_key_is_refused(ca: FleetCA) -> None:
    with pytest.raises(CsrRefused, match="signature does not verify"):
        ca.sign_device_csr(_with_bad_signature(_csr(_p256())), namespace="a", device_class="b", name="c")


@pytest.mark.parametrize(("namespace", "device_class", "name"), [("A", "b", "c"), ("a", "b:c", "d"), ("a", "b", "c.d")])
def test_names_are_checked(ca: FleetCA, namespace: str, device_class: str, name: str) -> None:
    with pytest.raises(PkiError, match="is not a DNS-1123"):
        ca.sign_device_csr(_csr(_p256()), namespace=namespace, device_class=device_class, name=name)


def _foreign_leaf(subject_cn: str, uris: list[str]) -> bytes:
    key = _p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(_PEM)


@pytest.mark.parametrize(
    ("certificate", "problem"),
    [
        (b"not a certificate", "not an X.509 certificate"),
        (_foreign_leaf("x", []), "no subject alternative names"),
        (_foreign_leaf("a.c", ["https://example.com"]), "0 device URIs"),
        (_foreign_leaf("a.c", ["urn:edgefleet:device:a:b:c", "urn:edgefleet:device:a:b:d"]), "2 device URIs"),
        (_foreign_leaf("a.c", ["urn:edgefleet:device:a:b"]), "is not urn:edgefleet:device"),
        (_foreign_leaf("a.c", ["urn:edgefleet:device:A:b:c"]), "not a DNS-1123 label"),
        (_foreign_leaf("a.other", ["urn:edgefleet:device:a:b:c"]), "does not match its device URI"),
    ],
)
def test_identity_refuses_what_is_not_a_device_certificate(certificate: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        identity_from_certificate(certificate)


def test_the_ca_and_server_certificates_are_not_device_identities(ca: FleetCA) -> None:
    server_pem, _ = ca.issue_server_certificate(["localhost"])
    for certificate in (ca.certificate_pem, server_pem):
        with pytest.raises(ValueError, match="device"):
            identity_from_certificate(certificate)


# ------------------------------------------------------------------------------------- PKI folder


def test_init_writes_the_four_files_with_private_keys_0600(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["localhost", "127.0.0.1", "gateway.example.com", "::1"])
    modes = {name: stat.S_IMODE((pki / name).stat().st_mode) for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    assert modes == {CA_CERT: 0o644, CA_KEY: 0o600, SERVER_CERT: 0o644, SERVER_KEY: 0o600}
    files = load_pki(pki)
    server = x509.load_pem_x509_certificate(files.server_cert_pem)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gateway.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert FleetCA.load(pki).certificate_pem == files.ca_pem


def test_init_never_replaces_a_ca(tmp_path: Path) -> None:
    init_pki(tmp_path, ["localhost"])
    before = (tmp_path / CA_KEY).read_bytes()
    with pytest.raises(PkiError, match="refusing to replace the fleet CA"):
        init_pki(tmp_path, ["localhost"])
    assert (tmp_path / CA_KEY).read_bytes() == before


def test_loading_reports_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"ca\.pem is missing"):
        load_pki(tmp_path)
    init_pki(tmp_path, ["localhost"])
    (tmp_path / SERVER_KEY).write_bytes(_key_pem(_p256()))
    with pytest.raises(PkiError, match=r"server-key\.pem is not the key of"):
        load_pki(tmp_path)
    other = tmp_path / "other"
    init_pki(other, ["localhost"])
    (tmp_path / SERVER_CERT).write_bytes((other / SERVER_CERT).read_bytes())
    (tmp_path / SERVER_KEY).write_bytes((other / SERVER_KEY).read_bytes())
    with pytest.raises(PkiError, match=r"was not issued by"):
        load_pki(tmp_path)
    (tmp_path / CA_KEY).write_bytes(b"junk")
    with pytest.raises(PkiError, match="not an unencrypted PEM private key"):
        FleetCA.load(tmp_path)
    (tmp_path / CA_KEY).write_bytes((other / CA_KEY).read_bytes())
    with pytest.raises(PkiError, match="do not belong together"):
        FleetCA.load(tmp_path)


@pytest.mark.parametrize("hosts", [[], ["not a host!"], ["-bad-.example"]])
def test_server_hosts_are_checked(ca: FleetCA, hosts: list[str]) -> None:
    with pytest.raises(PkiError):
        ca.issue_server_certificate(hosts)


# ------------------------------------------------------------------------------- TLS with grpc.aio

_METHOD = "/edgefleet.test.Echo/Whoami"


async def _whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    certificates = list(context.auth_context().get("x509_pem_cert", []))
    if not certificates:
        return b"anonymous"
    return identity_from_certificate(certificates[0]).device_id.encode()


@dataclass
class Gateway:
    ca: FleetCA
    mtls_port: int
    tls_port: int


@pytest_asyncio.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    init_pki(tmp_path, ["localhost", "127.0.0.1"])
    files = load_pki(tmp_path)
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "edgefleet.test.Echo", {"Whoami": grpc.unary_unary_rpc_method_handler(_whoami)}
    )
    server.add_generic_rpc_handlers((handler,))
    pair = [(files.server_key_pem, files.server_cert_pem)]
    mtls = grpc.ssl_server_credentials(pair, root_certificates=files.ca_pem, require_client_auth=True)
    mtls_port = server.add_secure_port("127.0.0.1:0", mtls)
    tls_port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
    await server.start()
    try:
        yield Gateway(FleetCA.load(tmp_path), mtls_port, tls_port)
    finally:
        await server.stop(None)


def _device_credentials(ca: FleetCA, trust: bytes, name: str = "cam-1") -> grpc.ChannelCredentials:
    key = _p256()
    issued = ca.sign_device_csr(_csr(key), namespace="factory", device_class="cpu-small", name=name)
    return grpc.ssl_channel_credentials(
        root_certificates=trust, private_key=_key_pem(key), certificate_chain=issued.certificate_pem
    )


async def _call(target: str, credentials: grpc.ChannelCredentials, *, host: str | None = None) -> bytes:
    options = [] if host is None else [("grpc.ssl_target_name_override", host)]
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        whoami: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(_METHOD)
        return await whoami(b"", timeout=10)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_device_certificate_completes_the_mtls_handshake(gateway: Gateway) -> None:
    credentials = _device_credentials(gateway.ca, gateway.ca.certificate_pem)
    assert await _call(f"127.0.0.1:{gateway.mtls_port}", credentials) == b"factory.cam-1"
    long_name = _device_credentials(gateway.ca, gateway.ca.certificate_pem, name="d" * 63)
    expected = f"factory.{'d' * 63}".encode()
    assert await _call(f"127.0.0.1:{gateway.mtls_port}", long_name, host="localhost") == expected


@pytest.mark.integration
@pytest.mark.asyncio
async def test_the_enrollment_listener_needs_no_client_certificate(gateway: Gateway) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=gateway.ca.certificate_pem)
    assert await _call(f"127.0.0.1:{gateway.tls_port}", credentials) == b"anonymous"


@pytest.mark.integration
@pytest.mark.asyncio
async def test_the_mtls_listener_refuses_strangers(gateway: Gateway) -> None:
    target = f"127.0.0.1:{gateway.mtls_port}"
    stranger_ca = FleetCA.create()
    refused = [
        grpc.ssl_channel_credentials(root_certificates=gateway.ca.certificate_pem),  # no client certificate
        _device_credentials(stranger_ca, gateway.ca.certificate_pem),  # a certificate from another CA
    ]
    for credentials in refused:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _call(target, credentials)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # And a device that does not trust the gateway's CA never talks to it.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _call(target, _device_credentials(gateway.ca, stranger_ca.certificate_pem))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_secret_carries_the_four_files_and_refuses_a_foreign_ca_key(tmp_path: Path) -> None:
    pki, other = tmp_path / "pki", tmp_path / "other"
    init_pki(pki, ["gateway.example.com"])
    init_pki(other, ["gateway.example.com"])
    files = pki_secret_files(pki)
    assert files == {name: (pki / name).read_bytes() for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    (pki / CA_KEY).write_bytes((other / CA_KEY).read_bytes())  # a CA key that cannot sign for ca.pem
    with pytest.raises(PkiError, match=r"ca-key\.pem is not the key of"):
        pki_secret_files(pki)


def test_renewing_the_server_certificate_keeps_the_ca_and_adds_hosts(tmp_path: Path) -> None:
    init_pki(tmp_path, ["gateway.example.com"])
    ca_before = (tmp_path / CA_CERT).read_bytes(), (tmp_path / CA_KEY).read_bytes()
    old_cert = (tmp_path / SERVER_CERT).read_bytes()
    renew_server_certificate(tmp_path, ["gateway.example.com", "fleet.example.com"], validity=timedelta(days=90))
    assert ((tmp_path / CA_CERT).read_bytes(), (tmp_path / CA_KEY).read_bytes()) == ca_before
    files = load_pki(tmp_path)  # the new pair belongs together and chains to the same CA
    assert files.server_cert_pem != old_cert
    cert = x509.load_pem_x509_certificate(files.server_cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["gateway.example.com", "fleet.example.com"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=90, minutes=10)
    (tmp_path / CA_KEY).unlink()
    with pytest.raises(PkiError, match="ca-key"):
        renew_server_certificate(tmp_path, ["gateway.example.com"])
