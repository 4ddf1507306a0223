"""GatewayService without a transport: enrollment, authentication, artifact reads, health intake.

A real LocalStore, a real fleet CA and a fake clock; every validation branch names its field.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.records import DeviceRecord
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from edgefleet_operator.gateway.pki import DeviceIdentity, FleetCA, identity_from_certificate
from edgefleet_operator.gateway.service import (
    CHUNK_BYTES,
    Accelerator,
    EnrollApplication,
    GatewayService,
    HardwareFacts,
    HealthSample,
    InstallOutcomeReport,
    ModelSample,
    ServicePolicy,
)

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def csr_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _badly_signed_csr() -> str:
    """A CSR that parses but whose signature does not verify (its last signature byte flipped)."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem().encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


HARDWARE = HardwareFacts(
    cpu_arch="x86_64",
    cpu_cores=4,
    cpu_features=("avx2", "avx512f"),
    memory_bytes=8 << 30,
    accelerators=(Accelerator("gpu", "NVIDIA Jetson Orin Nano", 0, ("CUDAExecutionProvider",)),),
    execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    storage_free_bytes=1 << 30,
)


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create()


@dataclasses.dataclass
class Gateway:
    clock: Clock
    store: LocalStore
    fleet: FleetState
    service: GatewayService
    ca: FleetCA

    def token(self, device_class: str = "cpu-small", **kwargs: Any) -> str:
        return self.fleet.create_token("demo", device_class, ttl=kwargs.pop("ttl", timedelta(hours=1)), **kwargs)

    def application(self, token: str, name: str = "cam-1", **changes: Any) -> EnrollApplication:
        base = EnrollApplication(
            bootstrap_token=token,
            csr_pem=csr_pem(),
            device_name=name,
            labels={"site": "berlin", "edgefleet.io/zone": "a"},
            hardware=HARDWARE,
            agent_version="0.1.0",
        )
        return dataclasses.replace(base, **changes)

    def enroll(self, name: str = "cam-1", device_class: str = "cpu-small") -> DeviceIdentity:
        result = self.service.enroll(self.application(self.token(device_class), name))
        return identity_from_certificate(result.certificate_chain_pem)

    def restarted(self, replica_id: str | None = None) -> GatewayService:
        """A second gateway process over the same store (a random replica id unless given)."""
        policy = dataclasses.replace(self.service.policy, replica_id=replica_id)
        return GatewayService(FleetState(self.store, clock=self.clock), self.store, self.ca, policy, clock=self.clock)

    def assign(self, name: str = "cam-1", model: str = "digits", version: str = "1.1.0") -> int:
        return self.fleet.assign("demo", [name], model_namespace="demo", model_name=model, version=version,
                                 action="install", target_paths=[f"cpu-small/demo/{model}/{version}/manifest.json"],
                                 bundle_sha256="ab" * 32, bundle_length=10)  # fmt: skip


@pytest.fixture
def gw(tmp_path: Path, ca: FleetCA) -> Gateway:
    clock = Clock()
    store = LocalStore(tmp_path / "store")
    fleet = FleetState(store, clock=clock)
    service = GatewayService(fleet, store, ca, ServicePolicy(status_interval=timedelta(seconds=10)), clock=clock)
    return Gateway(clock, store, fleet, service, ca)


# ------------------------------------------------------------------------------------ enrollment


def test_enroll_issues_a_certificate_for_the_token_identity(gw: Gateway) -> None:
    result = gw.service.enroll(gw.application(gw.token("cpu-small")))
    identity = identity_from_certificate(result.certificate_chain_pem)
    assert (result.device_id, result.namespace, result.device_class) == ("demo.cam-1", "demo", "cpu-small")
    assert (identity.device_id, identity.device_class) == ("demo.cam-1", "cpu-small")
    assert result.ca_bundle_pem == gw.ca.certificate_pem
    assert result.hints.heartbeat_interval == timedelta(seconds=30)
    record = gw.fleet.get_device("demo", "cam-1")
    assert record is not None
    assert record.cert_serial == identity.serial
    assert record.labels["site"] == "berlin"
    assert record.hardware["cpu_features"] == ["avx2", "avx512f"]
    assert gw.service.authenticate(identity).device_id == "demo.cam-1"


def test_a_pinned_token_name_wins(gw: Gateway) -> None:
    result = gw.service.enroll(gw.application(gw.token(device_name="pinned"), "asked-for"))
    assert result.device_id == "demo.pinned"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bootstrap_token": ""}, "bootstrap_token"),
        ({"bootstrap_token": "x" * 300}, "bootstrap_token"),
        ({"csr_pem": ""}, "csr_pem"),
        ({"csr_pem": "A" * 9000}, "csr_pem"),
        ({"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n"}, "csr_pem"),
        ({"device_name": ""}, "device_name"),
        ({"device_name": "Cam_1"}, "device_name"),
        ({"device_name": "a" * 64}, "device_name"),
        ({"labels": {"bad key!": "x"}}, "labels"),
        ({"labels": {"ok": "v" * 64}}, "labels"),
        ({"labels": {"Bad_Prefix/k": "v"}}, "labels"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
        ({"hardware": dataclasses.replace(HARDWARE, cpu_cores=0)}, "hardware.cpu_cores"),
        ({"hardware": dataclasses.replace(HARDWARE, cpu_arch="x86 64")}, "hardware.cpu_arch"),
        ({"hardware": dataclasses.replace(HARDWARE, cpu_features=("AVX2",))}, "hardware.cpu_features[0]"),
        (
            {"hardware": dataclasses.replace(HARDWARE, execution_providers=("x" * 65,))},
            "hardware.execution_providers[0]",
        ),
        (
            {"hardware": dataclasses.replace(HARDWARE, accelerators=(Accelerator("fpga", "", 0, ()),))},
            "hardware.accelerators[0].type",
        ),
        ({"agent_version": "not a version"}, "agent_version"),
    ],
)
def test_enroll_refuses_each_malformed_field(gw: Gateway, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        gw.service.enroll(gw.application(gw.token(), **changes))
    assert caught.value.field.startswith(field)


def test_an_ed25519_csr_is_refused(gw: Gateway) -> None:
    with pytest.raises(InvalidArgument, match="P-256") as caught:
        gw.service.enroll(gw.application(gw.token(), csr_pem=csr_pem(ed25519.Ed25519PrivateKey.generate())))
    assert caught.value.field == "csr_pem"


def test_unknown_expired_and_used_tokens_are_unauthenticated(gw: Gateway) -> None:
    with pytest.raises(Unauthenticated, match="malformed"):
        gw.service.enroll(gw.application("eft1.nothing"))
    with pytest.raises(Unauthenticated, match="unknown"):
        gw.service.enroll(gw.application("eft1.0123456789abcdef." + "A" * 43))
    expiring = gw.token(ttl=timedelta(minutes=1))
    gw.clock.advance(61)
    with pytest.raises(Unauthenticated, match="expired"):
        gw.service.enroll(gw.application(expiring))
    single = gw.token()
    gw.service.enroll(gw.application(single, "cam-1"))
    with pytest.raises(Unauthenticated, match="used"):
        gw.service.enroll(gw.application(single, "cam-2"))


def test_a_retried_enrollment_gets_the_same_identity_and_supersedes_the_old_certificate(gw: Gateway) -> None:
    token = gw.token()
    csr = csr_pem()  # the agent keeps its key across attempts
    first = identity_from_certificate(gw.service.enroll(gw.application(token, csr_pem=csr)).certificate_chain_pem)
    gw.clock.advance(30)
    second = identity_from_certificate(gw.service.enroll(gw.application(token, csr_pem=csr)).certificate_chain_pem)
    assert second.device_id == first.device_id
    assert second.serial != first.serial
    gw.service.authenticate(second)
    with pytest.raises(Unauthenticated, match="unknown certificate"):
        gw.service.authenticate(first)  # at once on the replica that re-enrolled it
    other = gw.restarted()
    with pytest.raises(Unauthenticated, match="unknown certificate"):
        other.authenticate(first)


def test_a_retry_within_the_grace_from_another_key_is_refused(gw: Gateway) -> None:
    # One unpinned batch token on many devices: a second device asking for an enrolled name within
    # the grace must not get its identity (it has another key).
    token = gw.fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1), uses=10)
    first = identity_from_certificate(gw.service.enroll(gw.application(token)).certificate_chain_pem)
    gw.clock.advance(60)
    with pytest.raises(PermissionDenied, match="already enrolled"):
        gw.service.enroll(gw.application(token, csr_pem=csr_pem()))
    assert gw.service.authenticate(first).name == "cam-1"


# --------------------------------------------------------------------------------- authentication


def test_unknown_and_foreign_class_certificates_are_unauthenticated(gw: Gateway) -> None:
    identity = gw.enroll()
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(dataclasses.replace(identity, serial="abc123"))
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(dataclasses.replace(identity, device_class="gpu-big"))
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(dataclasses.replace(identity, name="ghost", device_id="demo.ghost", serial="1f"))


def test_revocation_bites_within_the_cache_time(gw: Gateway) -> None:
    identity = gw.enroll()
    assert isinstance(gw.service.authenticate(identity), DeviceRecord)
    gw.fleet.revoke_device("demo", "cam-1")
    assert gw.service.cached_device(identity) is not None  # still trusted from the cache
    gw.clock.advance(30)  # the default cache time
    assert gw.service.cached_device(identity) is None
    with pytest.raises(PermissionDenied, match="revoked"):
        gw.service.authenticate(identity)
    with pytest.raises(PermissionDenied):
        gw.service.cached_device(identity)


def test_a_revoked_device_cannot_enroll_again_and_keeps_the_token_unspent(gw: Gateway) -> None:
    gw.enroll()
    gw.fleet.revoke_device("demo", "cam-1")
    token = gw.token("cpu-small")
    with pytest.raises(PermissionDenied, match="revoked"):
        gw.service.enroll(gw.application(token, "cam-1"))
    record = gw.fleet.get_device("demo", "cam-1")
    assert record is not None
    assert record.revoked
    # The refused attempt did not spend the token: another device may still use it.
    assert gw.fleet.check_token(token).uses_left == 1
    gw.service.enroll(gw.application(token, "cam-2"))


def test_a_token_pinned_to_the_name_re_admits_a_revoked_device(gw: Gateway) -> None:
    old = gw.enroll()
    gw.fleet.revoke_device("demo", "cam-1")
    result = gw.service.enroll(gw.application(gw.token("gpu-big", device_name="cam-1"), "ignored"))
    new = identity_from_certificate(result.certificate_chain_pem)
    assert (new.device_id, new.device_class) == ("demo.cam-1", "gpu-big")
    record = gw.fleet.get_device("demo", "cam-1")
    assert record is not None
    assert not record.revoked
    assert record.cert_serial == new.serial
    assert gw.service.authenticate(new).device_class == "gpu-big"
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(old)


def test_an_unpinned_token_cannot_take_over_an_enrolled_device(gw: Gateway) -> None:
    victim = gw.enroll("cam-1", "gpu-big")
    gw.clock.advance(3600)
    batch = gw.token("cpu-small", uses=100)  # an unrelated batch token of the same namespace
    with pytest.raises(PermissionDenied, match="already enrolled"):
        gw.service.enroll(gw.application(batch, "cam-1"))
    assert gw.fleet.check_token(batch).uses_left == 100  # refused before it was spent
    gw.clock.advance(60)  # past any cache time: the store still says cam-1 is the victim
    assert gw.restarted().authenticate(victim).device_class == "gpu-big"
    # The same token's use by the same name long after the grace period is no retry either.
    gw.service.enroll(gw.application(batch, "cam-2"))
    gw.clock.advance(600)
    with pytest.raises(PermissionDenied, match="already enrolled"):
        gw.service.enroll(gw.application(batch, "cam-2"))


def test_a_bad_csr_leaves_the_token_unspent(gw: Gateway) -> None:
    token = gw.token()
    bad = csr_pem(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(InvalidArgument, match="P-256"):
        gw.service.enroll(gw.application(token, csr_pem=bad))
    with pytest.raises(InvalidArgument, match="signature"):
        gw.service.enroll(gw.application(token, csr_pem=_badly_signed_csr()))
    assert gw.fleet.check_token(token).uses_left == 1
    assert gw.fleet.get_device("demo", "cam-1") is None
    gw.service.enroll(gw.application(token))


# ---------------------------------------------------------------------------------------- renewal


def test_renew_issues_a_new_certificate_and_keeps_the_old_one_for_the_grace(gw: Gateway) -> None:
    old = gw.enroll()
    gw.service.authenticate(old)  # cached as good
    result = gw.service.renew(old, csr_pem())
    new = identity_from_certificate(result.certificate_chain_pem)
    assert (new.device_id, new.device_class, new.name) == (old.device_id, old.device_class, old.name)
    assert (result.device_id, result.namespace, result.device_class) == ("demo.cam-1", "demo", "cpu-small")
    assert new.serial != old.serial
    record = gw.fleet.get_device("demo", "cam-1")
    assert record is not None
    assert (record.cert_serial, record.cert_not_after) == (new.serial, result.not_after)
    assert record.previous_cert_serial == old.serial
    assert gw.service.authenticate(new).cert_serial == new.serial
    # The response could have been lost: the old certificate still works, here and on other replicas...
    gw.clock.advance(60)
    assert gw.service.authenticate(old).name == "cam-1"
    assert gw.restarted().authenticate(old).name == "cam-1"
    # ... and once the grace is over it is refused everywhere.
    gw.clock.advance(gw.service.policy.renewal_grace.total_seconds())
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(old)
    with pytest.raises(Unauthenticated):
        gw.restarted().renew(old, csr_pem())


def test_a_renewal_whose_response_was_lost_is_repeated_from_the_old_certificate(gw: Gateway) -> None:
    old = gw.enroll()
    lost = identity_from_certificate(gw.service.renew(old, csr_pem()).certificate_chain_pem)
    first_renewal = gw.fleet.get_device("demo", "cam-1")
    gw.clock.advance(3600)
    again = identity_from_certificate(gw.service.renew(old, csr_pem()).certificate_chain_pem)
    record = gw.fleet.get_device("demo", "cam-1")
    assert record is not None
    assert first_renewal is not None
    assert (record.cert_serial, record.previous_cert_serial) == (again.serial, old.serial)
    # Renewing from the old certificate again does not restart its grace.
    assert record.renewed_at == first_renewal.renewed_at
    assert gw.service.authenticate(again).name == "cam-1"
    with pytest.raises(Unauthenticated):
        gw.service.authenticate(lost)  # the certificate nobody received is never accepted
    gw.clock.advance(gw.service.policy.identity_cache_ttl.total_seconds())
    with pytest.raises(Unauthenticated):
        gw.restarted().authenticate(lost)


def test_renew_refuses_revoked_devices_and_bad_csrs(gw: Gateway) -> None:
    identity = gw.enroll()
    with pytest.raises(InvalidArgument) as caught:
        gw.service.renew(identity, csr_pem(ed25519.Ed25519PrivateKey.generate()))
    assert caught.value.field == "csr_pem"
    with pytest.raises(InvalidArgument):
        gw.service.renew(identity, "")
    gw.fleet.revoke_device("demo", "cam-1")
    with pytest.raises(PermissionDenied, match="revoked"):
        gw.service.renew(identity, csr_pem())  # read afresh, not from the cache


# -------------------------------------------------------------------------------------- artifacts


def _publish(gw: Gateway, key: str, data: bytes) -> None:
    gw.store.put(f"tuf/{key}", data)


def _read(chunks: Any) -> tuple[bytes, list[int]]:
    pieces = list(chunks)
    for before, after in itertools.pairwise(pieces):
        assert after.offset == before.offset + len(before.data)
        assert not before.eof
    assert pieces[-1].eof
    assert all(len(p.data) <= CHUNK_BYTES for p in pieces)
    return b"".join(p.data for p in pieces), [p.offset for p in pieces]


def test_targets_stream_in_chunks_and_resume_from_an_offset(gw: Gateway) -> None:
    identity = gw.enroll()
    payload = bytes(range(256)) * (10 * 1024)  # 2.5 MiB
    _publish(gw, "targets/cpu-small/demo/m/1.0.0/abc.model.onnx", payload)
    path = "cpu-small/demo/m/1.0.0/abc.model.onnx"
    data, offsets = _read(gw.service.open_target(identity, path, 0, len(payload)))
    assert data == payload
    assert offsets == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    data, offsets = _read(gw.service.open_target(identity, path, 1_500_000, 1 << 62))
    assert data == payload[1_500_000:]
    assert offsets[0] == 1_500_000
    end = list(gw.service.open_target(identity, path, len(payload), len(payload)))
    assert [(c.data, c.eof, c.total_length) for c in end] == [(b"", True, len(payload))]


def test_metadata_is_read_by_role_and_version(gw: Gateway) -> None:
    _publish(gw, "metadata/timestamp.json", b'{"t": 1}')
    _publish(gw, "metadata/3.root.json", b'{"r": 3}')
    assert _read(gw.service.open_metadata("timestamp", 0, 0, 100))[0] == b'{"t": 1}'
    assert _read(gw.service.open_metadata("root", 3, 1, 100))[0] == b'"r": 3}'
    with pytest.raises(NotFound):
        gw.service.open_metadata("root", 4, 0, 100)


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda s, i: s.open_metadata("", 0, 0, 10), InvalidArgument, "role"),
        (lambda s, i: s.open_metadata("..", 0, 0, 10), InvalidArgument, "role"),
        (lambda s, i: s.open_metadata("a/b", 0, 0, 10), InvalidArgument, "role"),
        (lambda s, i: s.open_metadata("r" * 256, 0, 0, 10), InvalidArgument, "role"),
        (lambda s, i: s.open_metadata("timestamp", 0, 0, 0), InvalidArgument, "max_length"),
        (lambda s, i: s.open_metadata("timestamp", 0, 2**64 - 1, 10), InvalidArgument, "offset"),
        (lambda s, i: s.open_metadata("timestamp", 2**63, 0, 10), InvalidArgument, "version"),
        (lambda s, i: s.open_metadata("timestamp", 0, 9, 100), OutOfRange, None),
        (lambda s, i: s.open_metadata("timestamp", 0, 0, 3), ResourceExhausted, None),
        (lambda s, i: s.open_target(i, "", 0, 10), InvalidArgument, "target_path"),
        (lambda s, i: s.open_target(i, "cpu-small/../gpu/x", 0, 10), InvalidArgument, "target_path"),
        (lambda s, i: s.open_target(i, "/etc/passwd", 0, 10), InvalidArgument, "target_path"),
        (lambda s, i: s.open_target(i, "cpu-small/" + "a" * 10_000, 0, 10), InvalidArgument, "target_path"),
        (lambda s, i: s.open_target(i, "cpu-small/x", 0, 0), InvalidArgument, "max_length"),
        (lambda s, i: s.open_target(i, "gpu-big/demo/m/1.0.0/abc.model.onnx", 0, 10), PermissionDenied, None),
        (lambda s, i: s.open_target(i, "cpu-small/demo/m/9.9.9/abc.model.onnx", 0, 10), NotFound, None),
        (lambda s, i: s.open_target(i, "cpu-small/" + "a" * 1014, 0, 10), NotFound, None),
    ],
)
def test_fetch_refusals(gw: Gateway, call: Any, error: type[Exception], field: str | None) -> None:
    identity = gw.enroll()
    _publish(gw, "metadata/timestamp.json", b'{"t": 1}')
    _publish(gw, "targets/gpu-big/demo/m/1.0.0/abc.model.onnx", b"secret model")
    with pytest.raises(error) as caught:
        call(gw.service, identity)
    if field is not None:
        assert isinstance(caught.value, InvalidArgument)
        assert caught.value.field == field


# ------------------------------------------------------------------------------------------ health


def _model(**changes: Any) -> ModelSample:
    base = ModelSample("demo", "digits", "1.0.0", "a", 100, 2, 1.0, 2.0, 3.0, 1)
    return dataclasses.replace(base, **changes)


_WINDOWS = itertools.count()


def _sample(**changes: Any) -> HealthSample:
    """A health report of a window of its own (each call the next 10 s window), unless ``changes`` say otherwise."""
    start = START + timedelta(seconds=10 * next(_WINDOWS))
    base = HealthSample(start, timedelta(seconds=10), 12.5, 1 << 20, 1 << 30, 1 << 20, 1 << 30, (_model(),), None)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"window": timedelta(0)}, "window"),
        ({"window": timedelta(days=2)}, "window"),
        ({"cpu_percent": 100.5}, "cpu_percent"),
        ({"cpu_percent": float("nan")}, "cpu_percent"),
        ({"memory_used_bytes": 2 << 30}, "memory_used_bytes"),
        ({"disk_used_bytes": 2 << 30}, "disk_used_bytes"),
        ({"energy_joules": float("inf")}, "energy_joules"),
        ({"models": (_model(),) * 65}, "models"),
        ({"models": (_model(), _model())}, "models[1]"),
        ({"models": (_model(model_namespace=""),)}, "models[0].model_namespace"),
        ({"models": (_model(model_name="Digits"),)}, "models[0].model_name"),
        ({"models": (_model(version=""),)}, "models[0].version"),
        ({"models": (_model(error_count=101),)}, "models[0].error_count"),
        ({"models": (_model(accelerator_fallback_count=101),)}, "models[0].accelerator_fallback_count"),
        ({"models": (_model(latency_p50_ms=-1.0),)}, "models[0].latency_p50_ms"),
        ({"models": (_model(latency_p99_ms=1.5),)}, "models[0].latency_p95_ms"),
    ],
)
def test_health_reports_are_validated(gw: Gateway, changes: dict[str, Any], field: str) -> None:
    identity = gw.enroll()
    with pytest.raises(InvalidArgument) as caught:
        gw.service.report_health(identity, _sample(**changes))
    assert caught.value.field == field


def test_health_is_kept_in_memory_and_flushed_cumulatively(gw: Gateway) -> None:
    identity = gw.enroll()
    for _ in range(3):
        gw.service.report_health(identity, _sample())
    assert gw.fleet.read_health() == []  # nothing written on the hot path
    assert gw.service.pending_health() == 1
    assert gw.service.flush_health() == 1  # one shard: this replica's devices of the class
    assert gw.service.flush_health() == 0  # nothing new
    assert gw.service.pending_health() == 0
    [record] = gw.fleet.read_health("cpu-small")
    totals = record.totals["demo/digits@1.0.0"]
    assert (totals.windows, totals.inference_count, totals.error_count) == (3, 300, 6)
    assert record.last_window is not None
    assert record.last_window.models[0].slot == "a"

    # Another (or a restarted) gateway writes its own counts; readers add the replicas up.
    other = gw.restarted()
    assert other.replica_id != gw.service.replica_id
    other.report_health(identity, _sample(models=(_model(inference_count=50, error_count=0),)))
    assert other.flush_health() == 1
    [record] = gw.fleet.read_health("cpu-small")
    assert record.totals["demo/digits@1.0.0"].inference_count == 350
    [aggregate] = gw.fleet.aggregate("demo", "digits")
    assert aggregate.devices_reporting == 1
    assert aggregate.inference_count == 350


def test_a_resent_window_is_acknowledged_but_counted_once(gw: Gateway) -> None:
    identity = gw.enroll()
    window = _sample()
    gw.service.report_health(identity, window)
    gw.service.report_health(identity, window)  # its ack was lost: the agent sends it again
    gw.service.report_health(identity, _sample())
    stepped_back = _sample(window_start=window.window_start - timedelta(minutes=5))  # a device clock set back
    gw.service.report_health(identity, stepped_back)
    gw.service.flush_health()
    [record] = gw.fleet.read_health("cpu-small")
    assert record.totals["demo/digits@1.0.0"].windows == 3
    assert record.totals["demo/digits@1.0.0"].inference_count == 300


def test_a_device_keeps_health_totals_of_its_recent_versions_only(gw: Gateway) -> None:
    identity = gw.enroll()
    for version in range(1, 21):  # twenty rollouts of one model, plus another model all along
        gw.service.report_health(
            identity, _sample(models=(_model(version=f"{version}.0.0"), _model(model_name="faces", version="1.0.0")))
        )
    gw.service.flush_health()
    [record] = gw.fleet.read_health("cpu-small")
    digits = sorted(t.version for t in record.totals.values() if t.model_name == "digits")
    assert digits == sorted(f"{v}.0.0" for v in range(13, 21))  # the 8 reported last
    assert record.totals["demo/faces@1.0.0"].windows == 20  # another model's totals are untouched


def _samples(count: int) -> HealthSample:
    return _sample(models=(_model(inference_count=count, error_count=0),))


def test_a_device_moving_between_replicas_is_counted_once_per_report(gw: Gateway) -> None:
    identity = gw.enroll()
    second = gw.restarted()
    gw.service.report_health(identity, _samples(100))
    gw.service.flush_health()
    gw.clock.advance(11)
    second.report_health(identity, _samples(10))  # the device moved to the second replica
    second.flush_health()
    gw.clock.advance(11)
    gw.service.report_health(identity, _samples(1))  # and back
    gw.service.flush_health()
    gw.clock.advance(3600)
    gw.service.report_health(gw.enroll("cam-2"), _samples(5))  # the first replica keeps cam-1 in its shard
    gw.service.flush_health()
    records = {r.device_id: r for r in gw.fleet.read_health("cpu-small")}
    assert records["demo.cam-1"].totals["demo/digits@1.0.0"].inference_count == 111
    assert records["demo.cam-2"].totals["demo/digits@1.0.0"].inference_count == 5


def test_a_configured_replica_id_resumes_its_counts_after_a_restart(gw: Gateway) -> None:
    identity = gw.enroll()
    first = gw.restarted("gateway-0")
    first.report_health(identity, _samples(100))
    first.flush_health()
    again = gw.restarted("gateway-0")  # the same pod, restarted
    again.report_health(identity, _samples(7))
    again.flush_health()
    [record] = gw.fleet.read_health("cpu-small")
    assert record.totals["demo/digits@1.0.0"].inference_count == 107
    assert gw.fleet.read_replica_health("gateway-0", "cpu-small")[0].totals["demo/digits@1.0.0"].windows == 2


def _install(**changes: Any) -> InstallOutcomeReport:
    base = InstallOutcomeReport(7, "demo", "digits", "1.0.0", "1.1.0", "rolled_back", "SelfTestLatency",
                                "p95 40 ms over the 20 ms SLO", "self_test", START)  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_install_reports_are_kept_at_once_and_shown_in_health_from_the_next_flush(gw: Gateway) -> None:
    identity = gw.enroll()
    revision = gw.assign()
    assert gw.service.report_install(identity, _install(assignment_revision=revision)) is True
    assert len(gw.fleet.installs("demo")) == 1  # the install record: at once
    assert gw.fleet.read_health("cpu-small") == []  # the health record: at the next flush
    assert gw.service.flush_health() == 1
    [record] = gw.fleet.read_health("cpu-small")
    assert record.last_install is not None
    assert record.last_install.outcome == "rolled_back"
    assert gw.service.report_install(identity, _install(assignment_revision=revision)) is False
    assert len(gw.fleet.installs("demo")) == 1
    [aggregate] = gw.fleet.aggregate("demo", "digits")
    assert aggregate.installs_rolled_back == 1


def test_install_reports_of_revisions_never_assigned_are_refused(gw: Gateway) -> None:
    identity = gw.enroll()
    with pytest.raises(InvalidArgument, match="never assigned") as caught:
        gw.service.report_install(identity, _install(assignment_revision=1))  # nothing assigned yet
    assert caught.value.field == "assignment_revision"
    first = gw.assign()
    gw.assign("cam-2")  # another device's revision is not this one's
    assert gw.service.report_install(identity, _install(assignment_revision=first)) is True
    with pytest.raises(InvalidArgument, match="never assigned"):
        gw.service.report_install(identity, _install(assignment_revision=first + 1))
    with pytest.raises(InvalidArgument, match="never assigned"):
        gw.service.report_install(identity, _install(assignment_revision=2**63 - 1))
    later = gw.assign(version="1.2.0")  # a newer assignment is found although a lower one was cached
    assert gw.service.report_install(identity, _install(assignment_revision=later)) is True
    assert len(gw.fleet.installs("demo")) == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"assignment_revision": 0}, "assignment_revision"),
        ({"model_namespace": "Demo"}, "model_namespace"),
        ({"model_name": ""}, "model_name"),
        ({"to_version": "1 0"}, "to_version"),
        ({"reason": "self test"}, "reason"),
        ({"reason": "A" * 65}, "reason"),
        ({"message": "x" * 1025}, "message"),
        ({"failed_phase": None}, "failed_phase"),
        ({"outcome": "succeeded"}, "failed_phase"),
    ],
)
def test_install_reports_are_validated(gw: Gateway, changes: dict[str, Any], field: str) -> None:
    identity = gw.enroll()
    with pytest.raises(InvalidArgument) as caught:
        gw.service.report_install(identity, _install(**changes))
    assert caught.value.field == field


def test_a_real_cpus_feature_list_is_accepted_and_an_abusive_one_refused(gw: Gateway) -> None:
    # x86 servers list 100-250 flags in /proc/cpuinfo; the agent sends them all.
    many = tuple(f"flag{i}" for i in range(250))
    gw.service.enroll(gw.application(gw.token(), "cam-1", hardware=dataclasses.replace(HARDWARE, cpu_features=many)))
    too_many = tuple(f"flag{i}" for i in range(1025))
    with pytest.raises(InvalidArgument, match=r"hardware\.cpu_features"):
        gw.service.enroll(
            gw.application(gw.token(), "cam-2", hardware=dataclasses.replace(HARDWARE, cpu_features=too_many))
        )
