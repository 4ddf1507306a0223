"""Enrollment over server-authenticated TLS, the stored identity, and the hardware facts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.duration_pb2 import Duration

from edgefleet_agent.identity import (
    DeviceIdentity,
    EnrollmentError,
    GatewayHints,
    HardwareFacts,
    IdentityError,
    IdentityStore,
    certificate_signing_request,
    cpu_cores,
    cpu_features,
    enroll,
    measure_hardware,
    memory_bytes,
    new_key,
    read_token,
    renewal_due,
    renewed_identity,
)
from edgefleet_proto.v1 import fleet_pb2
from tests.unit.agent.fake_gateway import TOKEN, FakeGateway, FleetPki, RunningGateway, start_gateway

HARDWARE = HardwareFacts("x86_64", 2, ("avx2", "sse4_2"), 1 << 30, ("CPUExecutionProvider",), 1 << 32)


@pytest.fixture(scope="module")
def pki() -> FleetPki:
    return FleetPki()


@pytest_asyncio.fixture
async def running(pki: FleetPki) -> AsyncIterator[RunningGateway]:
    gateway = await start_gateway(FakeGateway(pki))
    yield gateway
    await gateway.server.stop(None)


def _enroll(running: RunningGateway, pki: FleetPki, state: Path, token: str = TOKEN, ca: bytes | None = None):  # type: ignore[no-untyped-def]
    return partial(
        enroll,
        state,
        target=running.enroll,
        gateway_ca_pem=pki.ca_pem if ca is None else ca,
        token=token,
        name="dev-1",
        labels={"site": "lab"},
        hardware=HARDWARE,
        agent_version="0.1.0",
        timeout=10,
    )


@pytest.mark.asyncio
async def test_enrollment_persists_a_private_key_and_the_issued_identity(
    running: RunningGateway, pki: FleetPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    identity = await asyncio.to_thread(_enroll(running, pki, tmp_path))
    assert (identity.device_id, identity.namespace, identity.device_class, identity.name) == (
        "default.dev-1",
        "default",
        "cpu-small",
        "dev-1",
    )
    folder = tmp_path / "identity"
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    assert IdentityStore(tmp_path).load() == identity
    # The certificate is for the key kept on the device.
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    request = running.gateway.enrolls[0]
    assert (request.device_name, dict(request.labels), list(request.hardware.cpu_features)) == (
        "dev-1",
        {"site": "lab"},
        ["avx2", "sse4_2"],
    )
    assert request.csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    # The token is a secret: in no log line and no file.
    assert TOKEN not in caplog.text
    assert all(TOKEN.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.asyncio
async def test_a_refused_token_is_not_retryable_and_the_key_is_kept_for_the_next_try(
    running: RunningGateway, pki: FleetPki, tmp_path: Path
) -> None:
    with pytest.raises(EnrollmentError) as caught:
        await asyncio.to_thread(_enroll(running, pki, tmp_path, token="eft1.nope.nope"))
    assert (caught.value.code, caught.value.retryable) == ("UNAUTHENTICATED", False)
    assert "eft1.nope" not in str(caught.value)
    key_before = (tmp_path / "identity" / "key.pem").read_bytes()
    assert IdentityStore(tmp_path).load() is None
    await asyncio.to_thread(_enroll(running, pki, tmp_path))
    assert (tmp_path / "identity" / "key.pem").read_bytes() == key_before


@pytest.mark.asyncio
async def test_an_unreachable_or_untrusted_gateway_is_retryable(
    running: RunningGateway, pki: FleetPki, tmp_path: Path
) -> None:
    with pytest.raises(EnrollmentError) as caught:
        await asyncio.to_thread(_enroll(running, pki, tmp_path, ca=FleetPki().ca_pem))
    assert caught.value.retryable
    assert running.gateway.enrolls == []


def test_a_damaged_identity_is_an_identity_error(tmp_path: Path) -> None:
    folder = tmp_path / "identity"
    folder.mkdir()
    (folder / "identity.json").write_text("{not json")
    with pytest.raises(IdentityError, match="unusable"):
        IdentityStore(tmp_path).load()


def test_hints_default_and_clamp() -> None:
    assert GatewayHints.from_proto(fleet_pb2.GatewayHints()) == GatewayHints()
    hints = fleet_pb2.GatewayHints(
        heartbeat_interval=Duration(nanos=1000),
        reconnect_backoff_initial=Duration(seconds=5),
        reconnect_backoff_max=Duration(seconds=2),
    )
    assert GatewayHints.from_proto(hints) == GatewayHints(
        heartbeat_interval=1.0, reconnect_backoff_initial=5.0, reconnect_backoff_max=5.0
    )


def test_cpu_features_come_from_flags_or_features(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor : 0\nflags : sse avx2 AVX512F avx2\n\nprocessor : 1\nflags : sse avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor : 0\nFeatures : fp asimd asimddp sve\n")
    assert cpu_features(x86) == ("avx2", "avx512f", "sse")
    assert cpu_features(arm) == ("asimd", "asimddp", "fp", "sve")
    assert cpu_features(tmp_path / "missing") == ()


def test_cgroup_limits_bound_cores_and_memory(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text("1048576\n")
    assert cpu_cores(tmp_path) == min(2, cpu_cores(tmp_path / "none"))
    assert memory_bytes(tmp_path) == 1048576
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert cpu_cores(tmp_path) == cpu_cores(tmp_path / "none") >= 1
    assert memory_bytes(tmp_path) > 1048576


def test_measured_hardware_is_plausible(tmp_path: Path) -> None:
    facts = measure_hardware(tmp_path / "state", ["CPUExecutionProvider"])
    message = facts.to_proto()
    assert message.cpu_arch
    assert message.cpu_cores >= 1
    assert message.memory_bytes > 0
    assert message.storage_free_bytes > 0
    assert list(message.cpu_features) == sorted(set(message.cpu_features))


def test_the_token_comes_from_one_place(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    assert read_token(None, token_file) == TOKEN
    assert read_token(TOKEN, None) == TOKEN
    assert read_token(f"{TOKEN}\n", None) == TOKEN  # from a Secret made with --from-file
    with pytest.raises(ValueError, match="empty"):
        read_token(" \n", None)
    assert read_token(" \n", None, enrolled=True) is None
    assert read_token(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        read_token(TOKEN, token_file)
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(None, token_file)
    with pytest.raises(ValueError, match="cannot read"):
        read_token(None, tmp_path / "missing")


def test_an_enrolled_device_needs_no_token_file(tmp_path: Path) -> None:
    # systemd's LoadCredential or a Secret may hold the token only until the device has enrolled.
    token_file = tmp_path / "token"
    assert read_token(None, tmp_path / "missing", enrolled=True) is None
    token_file.write_text("\n")
    assert read_token(None, token_file, enrolled=True) is None
    token_file.write_text(f"{TOKEN}\n")
    assert read_token(None, token_file, enrolled=True) == TOKEN  # kept: a lost identity enrolls again
    token_file.chmod(0)
    if os.geteuid() != 0:  # root reads any file
        with pytest.raises(ValueError, match="cannot read"):
            read_token(None, token_file, enrolled=True)


def _enrolled_identity(tmp_path: Path, pki: FleetPki) -> tuple[IdentityStore, DeviceIdentity]:
    store = IdentityStore(tmp_path)
    credentials = pki.device_credentials("default.dev-1")
    leaf = x509.load_pem_x509_certificate(credentials.certificate_chain_pem)
    identity = DeviceIdentity("default.dev-1", "default", "cpu-small", "dev-1", leaf.not_valid_after_utc, credentials)
    store.save(identity)
    return store, identity


def _renewed(pki: FleetPki, current: DeviceIdentity) -> DeviceIdentity:
    key = new_key()
    chain = pki.sign_csr(certificate_signing_request(key, "dev-1"), current.device_id)
    response = fleet_pb2.EnrollResponse(
        certificate_chain_pem=chain.decode(),
        ca_bundle_pem=pki.ca_pem.decode(),
        device_id=current.device_id,
        namespace=current.namespace,
        device_class=current.device_class,
    )
    return renewed_identity(response, key, current)


def test_a_renewal_interrupted_after_its_journal_is_finished_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = FleetPki()
    store, identity = _enrolled_identity(tmp_path, pki)
    renewed = _renewed(pki, identity)
    assert renewal_due(identity) < identity.not_after

    def crash(*args: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(IdentityStore, "save", crash)  # dies right after the journal is durable
    with pytest.raises(SystemExit):
        store.save_renewed(renewed)
    monkeypatch.undo()
    assert (store.directory / "renewal.json").stat().st_mode & 0o777 == 0o600
    loaded = store.load()
    assert loaded is not None
    assert loaded.credentials.key_pem == renewed.credentials.key_pem
    assert loaded.credentials.certificate_chain_pem == renewed.credentials.certificate_chain_pem
    assert not (store.directory / "renewal.json").exists()


def test_a_renewal_that_never_became_durable_leaves_the_old_pair(tmp_path: Path) -> None:
    pki = FleetPki()
    store, identity = _enrolled_identity(tmp_path, pki)
    renewed = _renewed(pki, identity)
    # A journal whose key is not the certificate's (cannot happen from save_renewed; a hand edit):
    (store.directory / "renewal.json").write_text(
        json.dumps(
            {
                "key_pem": identity.credentials.key_pem.decode(),
                "certificate_chain_pem": renewed.credentials.certificate_chain_pem.decode(),
                "ca_pem": pki.ca_pem.decode(),
                "not_after": renewed.not_after.isoformat(),
            }
        )
    )
    loaded = store.load()
    assert loaded is not None
    assert loaded.credentials == identity.credentials
    assert not (store.directory / "renewal.json").exists()
    store.save_renewed(renewed)
    after = store.load()
    assert after is not None
    assert after.credentials == renewed.credentials


def test_renewal_counts_the_lifetime_from_receipt_not_from_the_backdated_not_before(tmp_path: Path) -> None:
    # Found by the certificate-expiry fault test: the gateway backdates not-before by 5 minutes for
    # lagging clocks, so a certificate of a few minutes was "due" at once, renewed into another one
    # due at once, and then (renewals being at least a minute apart) left to expire.
    pki = FleetPki()  # backdates one minute
    current = _enrolled_identity(tmp_path, pki)[1]
    key = new_key()
    chain = pki.sign_csr(certificate_signing_request(key, "dev-1"), current.device_id, timedelta(seconds=60))
    response = fleet_pb2.EnrollResponse(certificate_chain_pem=chain.decode(), ca_bundle_pem=pki.ca_pem.decode(),
                                        device_id=current.device_id, namespace=current.namespace,
                                        device_class=current.device_class)  # fmt: skip
    before = datetime.now(UTC)
    renewed = renewed_identity(response, key, current)
    assert renewed.received_at is not None
    assert before <= renewed.received_at <= datetime.now(UTC)
    lifetime = renewed.not_after - renewed.received_at
    assert renewal_due(renewed) >= renewed.received_at + lifetime * 0.6  # not at once
    store = IdentityStore(tmp_path)
    store.save_renewed(renewed)
    loaded = store.load()
    assert loaded is not None
    assert loaded.received_at == renewed.received_at
    assert renewal_due(loaded) == renewal_due(renewed)
