"""The fleet state over a real LocalStore: tokens, devices, assignments, health, installs, aggregates."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import (
    DeviceHealthRecord,
    DeviceRecord,
    FleetInputError,
    FleetRecordError,
    FleetState,
    HealthWindow,
    InstallRecord,
    ModelTotals,
    ModelWindow,
    TokenRefused,
    UnknownDevice,
    WaveRef,
    totals_key,
)
from edgefleet_operator.fleet.state import MAX_RECORD_BYTES, TOKEN_RETRY_GRACE
from tests.unit.fleet.conftest import Clock

SHA = "ab" * 32
TOKEN = re.compile(r"^eft1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}$")


def _device(namespace: str = "factory", name: str = "cam-1", device_class: str = "cpu-small") -> DeviceRecord:
    return DeviceRecord(
        device_id=f"{namespace}.{name}",
        namespace=namespace,
        name=name,
        device_class=device_class,
        labels={"site": "berlin"},
        hardware={"cpu_arch": "x86_64", "cpu_cores": 4, "cpu_features": ["avx2"]},
        agent_version="0.1.0",
        cert_serial="1f2e3d",
        cert_not_after=datetime(2026, 4, 1, tzinfo=UTC),
        enrolled_at=datetime(2026, 3, 1, tzinfo=UTC),
    )


def _assign(fleet: FleetState, names: list[str], version: str = "1.0.0", model: str = "digits", **kw: object) -> int:
    return fleet.assign(
        "factory",
        names,
        model_namespace="factory",
        model_name=model,
        version=version,
        action="install",
        target_paths=[f"cpu-small/factory/{model}/{version}/manifest.json"],
        bundle_sha256=SHA,
        bundle_length=1234,
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------ tokens


def test_a_token_is_stored_only_as_its_digest(fleet: FleetState, store: LocalStore) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1))
    assert TOKEN.fullmatch(token)
    secret = token.split(".")[2]
    keys = store.list("fleet/tokens/")
    assert keys == [f"fleet/tokens/{token.split('.')[1]}.json"]
    stored = store.get(keys[0], max_bytes=MAX_RECORD_BYTES)
    assert secret.encode() not in stored
    assert json.loads(stored)["uses_left"] == 1


def test_redeem_spends_a_use_and_records_who(fleet: FleetState, clock: Clock) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1))
    checked = fleet.check_token(token)
    assert (checked.namespace, checked.device_class, checked.uses_left) == ("factory", "cpu-small", 1)
    spent = fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert spent.uses_left == 0
    assert [(u.device_name, u.device_id, u.used_at) for u in spent.used_by] == [("cam-1", "factory.cam-1", clock.now)]
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-2", "factory.cam-2")
    assert refused.value.reason == "used"


def test_a_retry_by_the_same_name_within_the_grace_gets_the_same_identity(fleet: FleetState, clock: Clock) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(minutes=2))
    first = fleet.redeem_token(token, "cam-1", "factory.cam-1")
    clock.advance(TOKEN_RETRY_GRACE - timedelta(seconds=1))  # also past the token's own expiry
    again = fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert again == first
    clock.advance(timedelta(seconds=2))
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert refused.value.reason == "expired"


def test_after_the_grace_a_spent_token_is_used(fleet: FleetState, clock: Clock) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(days=1))
    fleet.redeem_token(token, "cam-1", "factory.cam-1")
    clock.advance(TOKEN_RETRY_GRACE + timedelta(seconds=1))
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert refused.value.reason == "used"


def test_an_expired_token_is_refused(fleet: FleetState, clock: Clock) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1))
    clock.advance(timedelta(hours=1))
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert refused.value.reason == "expired"


def test_a_multi_use_token_enrolls_several_devices(fleet: FleetState) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1), uses=2)
    fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert fleet.redeem_token(token, "cam-2", "factory.cam-2").uses_left == 0
    with pytest.raises(TokenRefused, match="has been used"):
        fleet.redeem_token(token, "cam-3", "factory.cam-3")


def test_a_pinned_name_is_the_only_name(fleet: FleetState) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1), device_name="cam-7")
    assert fleet.check_token(token).device_name == "cam-7"
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert refused.value.reason == "name-mismatch"
    assert fleet.redeem_token(token, "cam-7", "factory.cam-7").uses_left == 0


@pytest.mark.parametrize(
    "token",
    [
        "",
        "eft1",
        "eft1..",
        "eft2.0123456789abcdef." + "a" * 43,
        "eft1.0123456789ABCDEF." + "a" * 43,
        "eft1.0123456789abcdef." + "a" * 42,
        "eft1.0123456789abcdef." + "a" * 43 + ".extra",
        "eft1.0123456789abcdef." + "a" * 42 + "=",
        "eft1.../../etc/passwd." + "a" * 43,
    ],
)
def test_malformed_tokens_are_refused_without_reading_the_store(fleet: FleetState, token: str) -> None:
    with pytest.raises(TokenRefused) as refused:
        fleet.redeem_token(token, "cam-1", "factory.cam-1")
    assert refused.value.reason == "malformed"


def test_unknown_id_and_wrong_secret_read_the_same(fleet: FleetState) -> None:
    token = fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1))
    _, token_id, secret = token.split(".")
    wrong_secret = f"eft1.{token_id}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    unknown_id = f"eft1.{'0' * 16}.{secret}"
    for bad in (wrong_secret, unknown_id):
        with pytest.raises(TokenRefused) as refused:
            fleet.redeem_token(bad, "cam-1", "factory.cam-1")
        assert refused.value.reason == "unknown"
        assert secret not in str(refused.value)
    assert fleet.check_token(token).uses_left == 1  # the failed attempts spent nothing


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"ttl": timedelta(0)}, "TTL"),
        ({"ttl": timedelta(hours=1), "uses": 0}, "at least one use"),
        ({"ttl": timedelta(hours=1), "device_name": "Not_A_Label"}, "device_name"),
    ],
)
def test_invalid_tokens_are_not_created(fleet: FleetState, kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(FleetInputError, match=problem):
        fleet.create_token("factory", "cpu-small", **kwargs)  # type: ignore[arg-type]


def test_a_token_for_a_bad_namespace_is_not_created(fleet: FleetState) -> None:
    with pytest.raises(FleetInputError, match="namespace"):
        fleet.create_token("Factory", "cpu-small", ttl=timedelta(hours=1))


# ----------------------------------------------------------------------------------------- devices


def test_devices_round_trip_list_and_revoke(fleet: FleetState) -> None:
    assert fleet.get_device("factory", "cam-1") is None
    fleet.put_device(_device(name="cam-2"))
    fleet.put_device(_device(name="cam-1"))
    fleet.put_device(_device(namespace="lab", name="cam-1"))
    assert fleet.get_device("factory", "cam-1") == _device(name="cam-1")
    assert [d.device_id for d in fleet.list_devices()] == ["factory.cam-1", "factory.cam-2", "lab.cam-1"]
    assert [d.device_id for d in fleet.list_devices("lab")] == ["lab.cam-1"]
    revoked = fleet.revoke_device("factory", "cam-1")
    assert revoked.revoked
    assert fleet.get_device("factory", "cam-1") == revoked
    with pytest.raises(UnknownDevice, match="factory/cam-9"):
        fleet.revoke_device("factory", "cam-9")


def test_a_device_id_must_be_namespace_dot_name() -> None:
    with pytest.raises(ValueError, match="device_id"):
        DeviceRecord.model_validate({**_device().model_dump(), "device_id": "factory.other"})


def test_naive_datetimes_are_refused_and_others_stored_as_utc() -> None:
    data = _device().model_dump()
    with pytest.raises(ValueError, match="timezone"):
        DeviceRecord.model_validate({**data, "enrolled_at": datetime(2026, 3, 1)})
    shifted = DeviceRecord.model_validate({**data, "enrolled_at": "2026-03-01T13:00:00+01:00"})
    assert shifted.enrolled_at == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert shifted.enrolled_at.tzinfo is UTC


@pytest.mark.parametrize(("namespace", "name"), [("..", "x"), ("factory", "../x"), ("factory", "A"), ("", "x")])
def test_names_that_are_not_labels_never_become_keys(fleet: FleetState, namespace: str, name: str) -> None:
    with pytest.raises(FleetInputError):
        fleet.get_device(namespace, name)


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b'{"device_id": "factory.cam-1"}', b'{"x": 1}' + b" " * 100]
)
def test_a_malformed_device_record_names_its_key(fleet: FleetState, store: LocalStore, content: bytes) -> None:
    store.put("fleet/devices/factory/cam-1.json", content)
    with pytest.raises(FleetRecordError) as error:
        fleet.get_device("factory", "cam-1")
    assert error.value.key == "fleet/devices/factory/cam-1.json"
    assert "fleet/devices/factory/cam-1.json" in str(error.value)
    with pytest.raises(FleetRecordError):
        fleet.list_devices()


def test_an_oversized_record_is_not_read(fleet: FleetState, store: LocalStore) -> None:
    store.put("fleet/devices/factory/cam-1.json", b" " * (MAX_RECORD_BYTES + 1))
    with pytest.raises(FleetRecordError, match="larger than"):
        fleet.get_device("factory", "cam-1")


def test_a_device_record_under_another_devices_key_is_refused(fleet: FleetState, store: LocalStore) -> None:
    fleet.put_device(_device(name="cam-1"))
    store.put("fleet/devices/factory/cam-2.json", store.get("fleet/devices/factory/cam-1.json", max_bytes=1 << 20))
    with pytest.raises(FleetRecordError, match="factory/cam-1"):
        fleet.get_device("factory", "cam-2")
    with pytest.raises(FleetRecordError, match=r"fleet/devices/factory/cam-2\.json"):
        fleet.list_devices()


def test_listing_ignores_objects_that_are_not_records(fleet: FleetState, store: LocalStore) -> None:
    fleet.put_device(_device())
    store.put("fleet/devices/factory/README.txt", b"notes")
    assert [d.name for d in fleet.list_devices()] == ["cam-1"]


# ------------------------------------------------------------------------------------- assignments


def test_revisions_are_head_plus_one_and_persist(fleet: FleetState, store: LocalStore, clock: Clock) -> None:
    assert fleet.head_revision() == 0
    assert _assign(fleet, ["cam-1", "cam-2"]) == 1
    assert _assign(fleet, ["cam-1"], version="1.1.0") == 2
    assert json.loads(store.get("fleet/assignments/HEAD.json", max_bytes=100)) == {"revision": 2}
    replica = FleetState(store, clock=clock)
    assert replica.head_revision() == 2
    assert _assign(replica, ["cam-2"], model="faces") == 3
    cam1 = fleet.assignments_for("factory", "cam-1")
    assert {k: (a.version, a.revision) for k, a in cam1.assignments.items()} == {"factory/digits": ("1.1.0", 2)}
    cam2 = fleet.assignments_for("factory", "cam-2")
    assert {k: (a.version, a.revision) for k, a in cam2.assignments.items()} == {
        "factory/digits": ("1.0.0", 1),
        "factory/faces": ("1.0.0", 3),
    }
    assert cam2.revision == 3


def test_a_revision_is_never_reused_after_a_run_that_died_before_head(fleet: FleetState, store: LocalStore) -> None:
    _assign(fleet, ["cam-1"])
    store.put("fleet/assignments/HEAD.json", b'{"revision": 0}')  # as if HEAD had never been written
    assert _assign(fleet, ["cam-1"], version="1.1.0") == 2
    assert fleet.head_revision() == 2


def test_an_assignment_keeps_every_field(fleet: FleetState) -> None:
    revision = _assign(fleet, ["cam-1"], delta_from_version="0.9.0", wave=WaveRef(index=0, count=3, percent=10))
    record = fleet.assignments_for("factory", "cam-1").assignments["factory/digits"]
    assert record.revision == revision
    assert record.delta_from_version == "0.9.0"
    assert record.wave == WaveRef(index=0, count=3, percent=10)
    assert (record.bundle_sha256, record.bundle_length, record.action) == (SHA, 1234, "install")


def test_a_device_never_assigned_has_no_assignments(fleet: FleetState) -> None:
    empty = fleet.assignments_for("factory", "cam-1")
    assert (empty.namespace, empty.name, empty.assignments, empty.revision) == ("factory", "cam-1", {}, 0)


@pytest.mark.parametrize(
    ("names", "override", "problem"),
    [
        ([], {}, "no devices"),
        (["cam-1"], {"bundle_sha256": "xyz"}, "bundle_sha256"),
        (["cam-1"], {"bundle_length": -1}, "bundle_length"),
        (["cam-1"], {"target_paths": ["../escape"]}, "target_paths"),
        (["Cam_1"], {}, "device name"),
        (["cam-1"], {"target_paths": []}, "needs the bundle"),
        (["cam-1"], {"action": "remove"}, "names no bundle"),
    ],
)
def test_invalid_assignments_change_nothing(
    fleet: FleetState, store: LocalStore, names: list[str], override: dict[str, object], problem: str
) -> None:
    arguments: dict[str, object] = {
        "model_namespace": "factory",
        "model_name": "digits",
        "version": "1.0.0",
        "action": "install",
        "target_paths": ["a/manifest.json"],
        "bundle_sha256": SHA,
        "bundle_length": 1,
    }
    with pytest.raises(FleetInputError, match=problem):
        fleet.assign("factory", names, **{**arguments, **override})  # type: ignore[arg-type]
    assert fleet.head_revision() == 0
    assert store.list("fleet/assignments/") == []


@pytest.mark.parametrize("content", [b"nope", b"{}", b'{"revision": -1}', b'{"revision": "3"}', b'{"revision": true}'])
def test_a_malformed_head_is_an_error_naming_it(fleet: FleetState, store: LocalStore, content: bytes) -> None:
    store.put("fleet/assignments/HEAD.json", content)
    with pytest.raises(FleetRecordError, match=r"fleet/assignments/HEAD\.json"):
        fleet.head_revision()


def test_assignments_of_another_device_under_a_key_are_refused(fleet: FleetState, store: LocalStore) -> None:
    _assign(fleet, ["cam-1"])
    store.put(
        "fleet/assignments/factory/cam-2.json", store.get("fleet/assignments/factory/cam-1.json", max_bytes=1 << 20)
    )
    with pytest.raises(FleetRecordError, match="factory/cam-1"):
        fleet.assignments_for("factory", "cam-2")


# ------------------------------------------------------------------------------ health and installs


def _totals(version: str, inferences: int, errors: int, p95: float, model: str = "digits") -> ModelTotals:
    return ModelTotals(
        model_namespace="factory",
        model_name=model,
        version=version,
        windows=3,
        inference_count=inferences,
        error_count=errors,
        accelerator_fallback_count=1,
        last_p50_ms=p95 / 2,
        last_p95_ms=p95,
        last_p99_ms=p95 * 1.5,
    )


def _health(name: str, totals: list[ModelTotals], device_class: str = "cpu-small", **kw: object) -> DeviceHealthRecord:
    window = HealthWindow(
        window_start=datetime(2026, 3, 1, 12, tzinfo=UTC),
        window_seconds=10.0,
        cpu_percent=35.0,
        memory_used_bytes=1 << 28,
        memory_total_bytes=1 << 30,
        disk_used_bytes=1 << 30,
        disk_total_bytes=1 << 34,
        models=[
            ModelWindow(
                model_namespace=t.model_namespace,
                model_name=t.model_name,
                version=t.version,
                slot="a",
                inference_count=10,
                error_count=0,
                latency_p50_ms=1.0,
                latency_p95_ms=t.last_p95_ms,
                latency_p99_ms=3.0,
                accelerator_fallback_count=0,
            )
            for t in totals
        ],
    )
    return DeviceHealthRecord(
        device_id=f"factory.{name}",
        namespace="factory",
        name=name,
        device_class=device_class,
        updated_at=datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC),
        last_window=window,
        totals={totals_key(t.model_namespace, t.model_name, t.version): t for t in totals},
        last_install=kw.get("last_install"),  # type: ignore[arg-type]
    )


def _install(revision: int, outcome: str, to_version: str = "1.1.0") -> InstallRecord:
    return InstallRecord.model_validate(
        {
            "revision": revision,
            "model_namespace": "factory",
            "model_name": "digits",
            "from_version": "1.0.0",
            "to_version": to_version,
            "outcome": outcome,
            "reason": "" if outcome == "succeeded" else "SelfTestFailed",
            "message": "",
            "failed_phase": None if outcome == "succeeded" else "self_test",
            "finished_at": datetime(2026, 3, 1, 12, revision, tzinfo=UTC),
        }
    )


def test_install_reports_are_kept_once(fleet: FleetState) -> None:
    assert fleet.record_install("factory", "cam-1", _install(4, "failed")) is True
    assert fleet.record_install("factory", "cam-1", _install(4, "failed")) is False
    assert fleet.record_install("factory", "cam-1", _install(4, "rolled_back")) is True
    assert fleet.record_install("lab", "cam-1", _install(5, "succeeded")) is True
    listed = [(ns, name, r.revision, r.outcome) for ns, name, r in fleet.installs()]
    assert listed == [
        ("factory", "cam-1", 4, "failed"),
        ("factory", "cam-1", 4, "rolled_back"),
        ("lab", "cam-1", 5, "succeeded"),
    ]
    assert [name for _, name, _ in fleet.installs("lab")] == ["cam-1"]


def test_health_records_round_trip_by_class(fleet: FleetState, store: LocalStore) -> None:
    fleet.write_health(_health("cam-1", [_totals("1.0.0", 100, 1, 5.0)]))
    fleet.write_health(_health("gpu-1", [_totals("1.0.0", 100, 1, 5.0)], device_class="gpu-large"))
    assert store.list("fleet/health/cpu-small/") == ["fleet/health/cpu-small/factory.cam-1.json"]
    assert [h.device_id for h in fleet.read_health()] == ["factory.cam-1", "factory.gpu-1"]
    assert [h.device_id for h in fleet.read_health("gpu-large")] == ["factory.gpu-1"]
    assert fleet.read_health("cpu") == []  # a class is a folder, never a prefix of another class
    with pytest.raises(FleetInputError, match="subdomain"):
        fleet.read_health("../tokens")
    store.put(
        "fleet/health/gpu-large/factory.cam-9.json",
        store.get("fleet/health/gpu-large/factory.gpu-1.json", max_bytes=1 << 20),
    )
    with pytest.raises(FleetRecordError, match=r"factory\.cam-9\.json"):
        fleet.read_health("gpu-large")


def test_two_replicas_see_the_same_health_and_aggregate(store: LocalStore, clock: Clock) -> None:
    one, two = FleetState(store, clock=clock), FleetState(store, clock=clock)
    for name in ("cam-1", "cam-2", "cam-3"):
        one.put_device(_device(name=name))
    # Devices connected to different replicas: each replica writes the records of its own devices.
    one.write_health(_health("cam-1", [_totals("1.0.0", 1000, 0, 4.0), _totals("1.1.0", 100, 0, 8.0)]))
    two.write_health(_health("cam-2", [_totals("1.1.0", 300, 30, 12.0)]))
    two.write_health(_health("cam-3", [_totals("1.1.0", 0, 0, 0.0), _totals("1.0.0", 10, 0, 2.0, model="faces")]))
    one.record_install("factory", "cam-1", _install(2, "succeeded"))
    two.record_install("factory", "cam-2", _install(2, "failed"))
    two.record_install("factory", "cam-2", _install(3, "succeeded"))  # the later report decides
    one.record_install("factory", "cam-3", _install(2, "rolled_back"))

    assert [h.device_id for h in one.read_health()] == [h.device_id for h in two.read_health()]
    aggregate = one.aggregate("factory", "digits")
    assert aggregate == two.aggregate("factory", "digits")
    assert [(a.device_class, a.version) for a in aggregate] == [("cpu-small", "1.0.0"), ("cpu-small", "1.1.0")]
    old, new = aggregate
    assert (old.devices_reporting, old.inference_count, old.error_count, old.error_rate) == (1, 1000, 0, 0.0)
    assert (old.installs_succeeded, old.installs_failed) == (0, 0)
    assert (new.devices_reporting, new.inference_count, new.error_count) == (3, 400, 30)
    assert new.error_rate == pytest.approx(30 / 400)
    assert (new.p95_ms_max, new.p95_ms_median) == (12.0, 10.0)  # cam-3 served nothing: no latency
    assert new.accelerator_fallback_count == 3
    assert (new.installs_succeeded, new.installs_failed, new.installs_rolled_back, new.installs_refused) == (2, 0, 1, 0)
    assert new.devices_healthy == 2
    assert new.healthy_ratio == pytest.approx(2 / 3)
    assert one.aggregate("factory", "digits", "gpu-large") == []
    assert [a.version for a in two.aggregate("factory", "faces")] == ["1.0.0"]


def test_aggregate_orders_versions_naturally(fleet: FleetState) -> None:
    fleet.write_health(_health("cam-1", [_totals("1.10.0", 1, 0, 1.0), _totals("1.9.0", 1, 0, 1.0)]))
    assert [a.version for a in fleet.aggregate("factory", "digits")] == ["1.9.0", "1.10.0"]


def test_a_malformed_health_record_names_its_key(fleet: FleetState, store: LocalStore) -> None:
    fleet.write_health(_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)]))
    store.put("fleet/health/cpu-small/factory.cam-2.json", b'{"device_id": 1}')
    with pytest.raises(FleetRecordError, match=r"fleet/health/cpu-small/factory\.cam-2\.json"):
        fleet.aggregate("factory", "digits")


def test_a_naive_clock_is_refused(store: LocalStore) -> None:
    fleet = FleetState(store, clock=lambda: datetime(2026, 3, 1))
    with pytest.raises(FleetInputError, match="naive"):
        fleet.create_token("factory", "cpu-small", ttl=timedelta(hours=1))


def test_a_remove_names_no_bundle(fleet: FleetState) -> None:
    _assign(fleet, ["cam-1"])
    revision = fleet.assign("factory", ["cam-1"], model_namespace="factory", model_name="digits", version="1.0.0",
                            action="remove", target_paths=[], bundle_sha256="", bundle_length=0)  # fmt: skip
    record = fleet.assignments_for("factory", "cam-1").assignments["factory/digits"]
    assert (record.revision, record.action, record.target_paths, record.bundle_sha256) == (revision, "remove", [], "")
