"""The fleet state over a real LocalStore: tokens, devices, assignments, health, installs, aggregates."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from edgefleet_operator.fleet import state as state_module
from edgefleet_operator.fleet.state import MAX_CHANGE_SPAN, MAX_RECORD_BYTES, TOKEN_RETRY_GRACE, merge_health
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


def _change(revision: int) -> str:
    return f"fleet/assignment-changes/{revision:020d}.json"


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order of its puts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        super().put(key, data)


def test_a_revisions_change_file_comes_first_and_head_last(tmp_path: Path, clock: Clock) -> None:
    store = RecordingStore(tmp_path / "store")
    _assign(FleetState(store, clock=clock), ["cam-1", "cam-2"])
    assert store.puts == [
        _change(1),
        "fleet/assignments/factory/cam-1.json",
        "fleet/assignments/factory/cam-2.json",
        "fleet/assignments/HEAD.json",
    ]


def test_changed_devices_are_those_the_revisions_in_range_touched(fleet: FleetState) -> None:
    assert _assign(fleet, ["cam-1", "cam-2"]) == 1
    assert fleet.assign("lab", ["cam-1"], model_namespace="factory", model_name="digits", version="1.0.0",
                        action="install", target_paths=["a/manifest.json"], bundle_sha256=SHA,
                        bundle_length=1) == 2  # fmt: skip
    assert fleet.assign("factory", ["cam-2"], model_namespace="factory", model_name="digits", version="1.0.0",
                        action="remove", target_paths=[], bundle_sha256="", bundle_length=0) == 3  # fmt: skip
    assert fleet.changed_devices(0, 1) == {("factory", "cam-1"), ("factory", "cam-2")}
    assert fleet.changed_devices(1, 2) == {("lab", "cam-1")}
    assert fleet.changed_devices(2, 3) == {("factory", "cam-2")}  # a remove is a change too
    assert fleet.changed_devices(0, 3) == {("factory", "cam-1"), ("factory", "cam-2"), ("lab", "cam-1")}
    assert fleet.changed_devices(3, 3) == set()
    assert fleet.changed_devices(3, 2) == set()
    assert (fleet.latest_revision_for("factory", "cam-2"), fleet.latest_revision_for("factory", "cam-9")) == (3, 0)
    with pytest.raises(FleetInputError, match="negative"):
        fleet.changed_devices(-1, 3)


def test_a_missing_change_file_is_a_gap(fleet: FleetState, store: LocalStore) -> None:
    _assign(fleet, ["cam-1"])
    _assign(fleet, ["cam-2"])
    _assign(fleet, ["cam-3"])
    store.delete(_change(2))
    assert fleet.changed_devices(0, 3) == {("factory", "cam-1"), ("factory", "cam-3")}
    assert fleet.changed_devices(3, 7) == set()  # revisions not (yet) written


def test_too_wide_a_range_asks_for_a_full_re_read(fleet: FleetState) -> None:
    _assign(fleet, ["cam-1"])
    assert fleet.changed_devices(0, MAX_CHANGE_SPAN) == {("factory", "cam-1")}
    assert fleet.changed_devices(0, MAX_CHANGE_SPAN + 1) is None


@pytest.mark.parametrize(
    "content",
    [b"{", b'{"revision": 1}', b'{"revision": 2, "namespace": "factory", "names": ["cam-1"]}'],
    ids=["truncated", "incomplete", "another-revision"],
)
def test_a_malformed_change_file_asks_for_a_full_re_read(
    fleet: FleetState, store: LocalStore, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    _assign(fleet, ["cam-1"])
    store.put(_change(1), content)
    assert fleet.changed_devices(0, 1) is None
    assert _change(1) in caplog.text


def test_a_run_that_died_after_its_change_file_never_has_its_revision_reused(
    fleet: FleetState, store: LocalStore
) -> None:
    _assign(fleet, ["cam-1"])
    # As if a run for revision 2 died after its change file and cam-9's assignments, before HEAD.
    store.put(_change(2), b'{"revision": 2, "namespace": "factory", "names": ["cam-9", "cam-8"]}')
    assert _assign(fleet, ["cam-1"], version="1.1.0") == 3
    assert fleet.head_revision() == 3
    # A gateway going from HEAD 1 to 3 also re-reads the died run's devices.
    assert fleet.changed_devices(1, 3) == {("factory", "cam-1"), ("factory", "cam-8"), ("factory", "cam-9")}


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
        window_start=kw.get("window_start", datetime(2026, 3, 1, 12, tzinfo=UTC)),  # type: ignore[arg-type]
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
        updated_at=kw.get("updated_at", datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC)),  # type: ignore[arg-type]
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


def test_health_shards_round_trip_by_class(fleet: FleetState, store: LocalStore) -> None:
    fleet.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 100, 1, 5.0)])])
    fleet.write_replica_health("gw-a", "gpu-large", [_health("gpu-1", [_totals("1.0.0", 9, 1, 5.0)], "gpu-large")])
    # One object per replica and class, however many devices it holds.
    assert store.list("fleet/health/cpu-small/") == ["fleet/health/cpu-small/replica-gw-a.json"]
    assert [h.device_id for h in fleet.read_health()] == ["factory.cam-1", "factory.gpu-1"]
    assert [h.device_id for h in fleet.read_health("gpu-large")] == ["factory.gpu-1"]
    assert fleet.read_health("cpu") == []  # a class is a folder, never a prefix of another class
    assert fleet.read_device_health("cpu-small", "factory.cam-1") == _health("cam-1", [_totals("1.0.0", 100, 1, 5.0)])
    assert fleet.read_device_health("cpu-small", "factory.cam-9") is None
    assert [h.device_id for h in fleet.read_replica_health("gw-a", "cpu-small")] == ["factory.cam-1"]
    assert fleet.read_replica_health("gw-b", "cpu-small") == []
    with pytest.raises(FleetInputError, match="subdomain"):
        fleet.read_health("../tokens")


@pytest.mark.parametrize(
    ("replica", "device_class", "records", "problem"),
    [
        ("GW_A", "cpu-small", [], "replica id"),
        ("", "cpu-small", [], "replica id"),
        ("gw-a", "../x", [], "subdomain"),
        ("gw-a", "cpu-small", [_health("gpu-1", [], "gpu-large")], "of class gpu-large"),
        ("gw-a", "cpu-small", [_health("cam-1", []), _health("cam-1", [])], "twice"),
    ],
)
def test_invalid_health_shards_are_not_written(
    fleet: FleetState,
    store: LocalStore,
    replica: str,
    device_class: str,
    records: list[DeviceHealthRecord],
    problem: str,
) -> None:
    with pytest.raises(FleetInputError, match=problem):
        fleet.write_replica_health(replica, device_class, records)
    assert store.list("fleet/health/") == []


def test_a_device_that_moves_between_replicas_is_counted_once_per_report(store: LocalStore, clock: Clock) -> None:
    # /work/notes/t_replica.py: 100 inferences via replica A, 10 via B, 1 more via A. Each replica
    # writes what it received; a replica's shard is cumulative for its own share.
    a, b = FleetState(store, clock=clock), FleetState(store, clock=clock)
    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    a.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 100, 2, 5.0)], updated_at=t0)])
    later = t0 + timedelta(seconds=11)
    b.write_replica_health("gw-b", "cpu-small", [_health("cam-1", [_totals("1.0.0", 10, 1, 7.0)], updated_at=later)])
    [merged] = a.read_health("cpu-small")
    assert merged.totals[totals_key("factory", "digits", "1.0.0")].inference_count == 110
    latest = later + timedelta(seconds=11)
    a.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 101, 2, 9.0)], updated_at=latest)])
    [merged] = b.read_health("cpu-small")
    totals = merged.totals[totals_key("factory", "digits", "1.0.0")]
    assert (totals.inference_count, totals.error_count, totals.windows, totals.accelerator_fallback_count) == (
        111, 3, 6, 2,
    )  # fmt: skip
    assert (totals.last_p50_ms, totals.last_p95_ms, totals.last_p99_ms) == (4.5, 9.0, 13.5)  # A's record is newer
    assert merged.updated_at == latest
    assert b.read_device_health("cpu-small", "factory.cam-1") == merged
    assert a.aggregate("factory", "digits")[0].inference_count == 111


def test_the_newest_window_and_install_win_and_versions_seen_once_are_kept(fleet: FleetState) -> None:
    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    old_window = _health("cam-1", [_totals("1.0.0", 5, 0, 1.0)], updated_at=t0, window_start=t0)
    new_window = _health(
        "cam-1",
        [_totals("1.1.0", 7, 0, 2.0)],
        updated_at=t0 + timedelta(seconds=5),
        window_start=t0 + timedelta(seconds=4),
        last_install=_install(2, "succeeded"),
    )
    # Updated last (an install report arrived there) but with no window and an older install.
    install_only = new_window.model_copy(
        update={"updated_at": t0 + timedelta(seconds=9), "last_window": None, "totals": {},
                "last_install": _install(1, "failed")}
    )  # fmt: skip
    fleet.write_replica_health("gw-a", "cpu-small", [old_window])
    fleet.write_replica_health("gw-b", "cpu-small", [new_window])
    fleet.write_replica_health("gw-c", "cpu-small", [install_only])
    merged = fleet.read_device_health("cpu-small", "factory.cam-1")
    assert merged is not None
    assert merged.last_window == new_window.last_window
    assert merged.last_install == _install(2, "succeeded")
    assert merged.updated_at == t0 + timedelta(seconds=9)
    assert sorted(merged.totals) == ["factory/digits@1.0.0", "factory/digits@1.1.0"]
    assert merged.totals["factory/digits@1.0.0"] == old_window.totals["factory/digits@1.0.0"]


def test_merge_health_needs_a_record() -> None:
    with pytest.raises(FleetInputError, match="no health records"):
        merge_health([])


@pytest.mark.parametrize(
    "content",
    [b"{", b'{"device_id": 1}', b"[]", b"x" * 3000],
    ids=["truncated", "wrong-shape", "not-an-object", "oversized"],
)
def test_a_bad_shard_is_skipped_reported_and_never_blocks_the_others(
    fleet: FleetState, store: LocalStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:  # fmt: skip
    monkeypatch.setattr(state_module, "MAX_SHARD_BYTES", 2000)  # cam-1 alone is under 1000
    fleet.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)])])
    store.put("fleet/health/cpu-small/replica-gw-b.json", content)
    records, skipped = fleet.read_health_report()
    assert [r.device_id for r in records] == ["factory.cam-1"]
    assert skipped == ["fleet/health/cpu-small/replica-gw-b.json"]
    assert "fleet/health/cpu-small/replica-gw-b.json" in caplog.text
    assert [a.inference_count for a in fleet.aggregate("factory", "digits")] == [1]
    with pytest.raises(FleetRecordError, match=r"replica-gw-b\.json"):
        fleet.read_replica_health("gw-b", "cpu-small")  # a replica resuming its own shard is told


def test_a_shard_under_another_replicas_key_is_skipped(fleet: FleetState, store: LocalStore) -> None:
    fleet.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)])])
    shard = store.get("fleet/health/cpu-small/replica-gw-a.json", max_bytes=1 << 20)
    store.put("fleet/health/cpu-small/replica-gw-b.json", shard)  # would count cam-1 twice
    store.put("fleet/health/gpu-large/replica-gw-a.json", shard)
    records, skipped = fleet.read_health_report()
    assert [r.totals["factory/digits@1.0.0"].inference_count for r in records] == [1]
    assert skipped == ["fleet/health/cpu-small/replica-gw-b.json", "fleet/health/gpu-large/replica-gw-a.json"]


def test_objects_that_are_not_shards_are_ignored(fleet: FleetState, store: LocalStore) -> None:
    fleet.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)])])
    store.put("fleet/health/cpu-small/factory.cam-2.json", b"{}")  # the per-device layout before shards
    store.put("fleet/health/cpu-small/README.txt", b"notes")
    store.put("fleet/health/stray.json", b"{}")
    assert fleet.read_health_report() == ([_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)])], [])


def test_a_shard_too_big_to_read_back_is_not_written(
    fleet: FleetState, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "MAX_SHARD_BYTES", 100)
    with pytest.raises(FleetInputError, match="over 100"):
        fleet.write_replica_health("gw-a", "cpu-small", [_health("cam-1", [_totals("1.0.0", 1, 0, 1.0)])])
    assert store.list("fleet/health/") == []


def test_two_replicas_see_the_same_health_and_aggregate(store: LocalStore, clock: Clock) -> None:
    one, two = FleetState(store, clock=clock), FleetState(store, clock=clock)
    for name in ("cam-1", "cam-2", "cam-3"):
        one.put_device(_device(name=name))
    # Devices connected to different replicas: each replica writes the records of its own devices.
    one.write_replica_health(
        "gw-1", "cpu-small", [_health("cam-1", [_totals("1.0.0", 1000, 0, 4.0), _totals("1.1.0", 100, 0, 8.0)])]
    )
    two.write_replica_health(
        "gw-2",
        "cpu-small",
        [
            _health("cam-2", [_totals("1.1.0", 300, 30, 12.0)]),
            _health("cam-3", [_totals("1.1.0", 0, 0, 0.0), _totals("1.0.0", 10, 0, 2.0, model="faces")]),
        ],
    )
    one.record_install("factory", "cam-1", _install(2, "succeeded"))
    two.record_install("factory", "cam-2", _install(2, "failed"))
    two.record_install("factory", "cam-2", _install(3, "succeeded"))  # the later report decides
    one.record_install("factory", "cam-3", _install(2, "rolled_back"))

    assert one.read_health() == two.read_health()
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
    fleet.write_replica_health(
        "gw-a", "cpu-small", [_health("cam-1", [_totals("1.10.0", 1, 0, 1.0), _totals("1.9.0", 1, 0, 1.0)])]
    )
    assert [a.version for a in fleet.aggregate("factory", "digits")] == ["1.9.0", "1.10.0"]


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
