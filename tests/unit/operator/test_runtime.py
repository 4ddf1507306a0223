"""The composition root and the pure parts of the kopf edge: keys, repository, settings, requeue schedule."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import kopf
import pytest

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import StoreUnavailable, VerificationError
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelStatus
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.kopf_app import EdgeModelDriver, KopfSettings, RequeueSchedule, _QuietTicks
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, ReconcileResult
from edgefleet_operator.runtime import (
    OperatorSettings,
    RuntimeSetupError,
    S3Options,
    build_reconciler,
    is_store_outage,
    load_keys,
    prepare_repository,
    reconciler_pool,
)


@pytest.fixture(scope="module")
def key_set() -> KeySet:
    return KeySet.generate()


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def test_a_full_key_folder_and_an_online_only_secret_both_load(tmp_path: Path, key_set: KeySet) -> None:
    full = _write(tmp_path / "full", key_set.to_files())
    online = _write(tmp_path / "online", key_set.to_files(online_only=True))
    (online / "..data").mkdir()  # a mounted Secret also holds Kubernetes' own links and folders
    assert not load_keys(full).online_only
    loaded = load_keys(online)
    assert loaded.online_only
    assert [k.keyid for k in loaded.public_keys("root")] == [k.keyid for k in key_set.public_keys("root")]


def test_missing_or_damaged_keys_say_what_to_do(tmp_path: Path, key_set: KeySet) -> None:
    with pytest.raises(RuntimeSetupError, match="edgefleet keys init"):
        load_keys(tmp_path / "nowhere")
    files = key_set.to_files()
    pem = next(name for name in files if name.endswith(".pem"))
    damaged = _write(tmp_path / "damaged", {**files, pem: b"not a key"})
    with pytest.raises(RuntimeSetupError, match=str(damaged)):
        load_keys(damaged)


def test_only_root_keys_create_a_repository(tmp_path: Path, key_set: KeySet) -> None:
    online = KeySet.from_files(key_set.to_files(online_only=True), "online")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(RuntimeSetupError, match="edgefleet keys init") as refused:
        prepare_repository(Publisher(store, online), online, initialize=True)
    assert "online roles" in str(refused.value)
    assert store.list("") == []  # nothing written
    with pytest.raises(RuntimeSetupError, match="initializing is turned off"):
        prepare_repository(Publisher(store, key_set), key_set, initialize=False)

    root = prepare_repository(Publisher(store, key_set), key_set, initialize=True)
    assert prepare_repository(Publisher(store, online), online, initialize=True) == root  # now online keys do


def test_build_reconciler_from_settings(tmp_path: Path, key_set: KeySet) -> None:
    key_set.save(tmp_path / "keys")
    settings = OperatorSettings(
        store_url=(tmp_path / "store").as_uri(), keys_dir=tmp_path / "keys", cache_dir=tmp_path / "cache"
    )
    assert isinstance(build_reconciler(settings), EdgeModelReconciler)
    with reconciler_pool(settings) as (reconciler, pool):
        assert isinstance(reconciler, EdgeModelReconciler)
        assert pool.submit(lambda: 7).result() == 7
    assert Publisher(LocalStore(tmp_path / "store"), key_set).is_initialized()


def test_settings_are_checked_when_built(tmp_path: Path) -> None:
    with pytest.raises(RuntimeSetupError, match="workers"):
        OperatorSettings(store_url="file:///x", keys_dir=tmp_path, workers=0)
    with pytest.raises(RuntimeSetupError, match="positive"):
        KopfSettings(tick_seconds=0)
    options = S3Options(endpoint="http://minio:9000", secure=False).as_source_options()
    assert options == {"endpoint": "http://minio:9000", "secure": "false"}


def test_retries_back_off_up_to_a_ceiling() -> None:
    settings = KopfSettings(retry_seconds=2, retry_max_seconds=30, identity="replica-a")
    assert [settings.retry_delay(n) for n in range(6)] == [2, 4, 8, 16, 30, 30]
    assert settings.retry_delay(10_000) == 30
    assert settings.user_agent().endswith("(replica-a)")


def test_the_requeue_schedule() -> None:
    now = [100.0]
    schedule = RequeueSchedule(clock=lambda: now[0])
    assert not schedule.is_due("a")  # unknown: its handler has not finished
    schedule.after("a", 30)
    assert not schedule.is_due("a")
    assert schedule.next_in("a") == 30
    now[0] += 30
    assert schedule.is_due("a")
    schedule.after("a", 300)
    schedule.wake("a")  # a DeviceClass it targets changed
    assert schedule.is_due("a")
    schedule.forget("a")
    assert not schedule.is_due("a")
    assert schedule.next_in("a") is None


def test_a_wake_during_a_reconcile_is_not_lost() -> None:
    now = [0.0]
    schedule = RequeueSchedule(clock=lambda: now[0])
    started = schedule.now()
    now[0] += 1
    schedule.wake("b")  # the first reconcile read the DeviceClasses before this change
    now[0] += 1
    schedule.after("b", 300, started=started)
    assert schedule.is_due("b")
    schedule.after("b", 300, started=schedule.now())  # the next one saw it: back to the resync
    assert not schedule.is_due("b")


def test_timer_ticks_are_not_logged() -> None:
    quiet = _QuietTicks()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)

    assert not quiet.filter(record("Timer 'requeue' succeeded."))
    assert quiet.filter(record("Handler 'changed/spec' succeeded."))


class _Recorder:
    """Stands in for the reconciler at the driver's seam: records the status it was given, answers a fixed one."""

    def __init__(self, answer: EdgeModelStatus) -> None:
        self.answer = answer
        self.seen: list[EdgeModelStatus | None] = []

    def reconcile(self, model: EdgeModel, classes: list[object]) -> ReconcileResult:
        self.seen.append(model.status)
        return ReconcileResult(self.answer, [], None)


def _body(status: dict[str, object] | None = None, **spec: object) -> kopf.Body:
    raw = {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "digits", "namespace": "vision", "uid": "u-1", "generation": 3},
        "spec": spec or {"source": {"uri": "file:///m.onnx", "sha256": "a" * 64}, "targets": {"deviceClasses": ["c"]}},
    }
    if status is not None:
        raw["status"] = status
    return kopf.Body(cast("kopf.RawBody", raw))


@pytest.mark.asyncio
async def test_the_driver_patches_the_whole_status_and_never_reuses_a_stale_one(tmp_path: Path) -> None:
    recorder = _Recorder(EdgeModelStatus(observed_generation=3, classes=1))
    settings = OperatorSettings(store_url="file:///unused", keys_dir=tmp_path)
    driver = EdgeModelDriver(settings, KopfSettings(), build=lambda *_: cast("EdgeModelReconciler", recorder))
    try:
        await driver.start()
        old = {"observedGeneration": 2, "classes": 4, "version": "1"}
        first = await driver.reconcile(_body(old), [])
        assert first.status_patch == {"version": None, "observedGeneration": 3, "classes": 1}  # merge patch
        assert recorder.seen[0] == EdgeModelStatus(observed_generation=2, classes=4, version="1")
        # A handler that waited for the first one holds a body from before its write: the write wins.
        await driver.reconcile(_body(old), [])
        assert recorder.seen[1] == EdgeModelStatus(observed_generation=3, classes=1)
        assert driver.schedule.next_in("u-1") is not None
    finally:
        driver.close()


@pytest.mark.asyncio
async def test_a_spec_the_model_refuses_stalls_naming_the_field_once(tmp_path: Path) -> None:
    recorder = _Recorder(EdgeModelStatus())
    settings = OperatorSettings(store_url="file:///unused", keys_dir=tmp_path)
    driver = EdgeModelDriver(settings, KopfSettings(), build=lambda *_: cast("EdgeModelReconciler", recorder))
    try:
        await driver.start()
        bad = {"source": {"uri": "file:///m.onnx", "sha256": "a" * 64}, "targets": {}}
        outcome = await driver.reconcile(_body(None, **bad), [])
        assert outcome.result is None
        assert outcome.problem is not None
        assert "spec.targets" in outcome.problem
        stalled = {c["type"]: c for c in outcome.status_patch["conditions"]}["Stalled"]
        assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
        assert outcome.status_patch["observedGeneration"] == 3
        again = await driver.reconcile(_body(outcome.status_patch, **bad), [])
        assert again.problem is None  # already reported: no second event
        assert recorder.seen == []
    finally:
        driver.close()


def test_only_store_outages_are_worth_retrying_at_start() -> None:
    wrapped = VerificationError("timestamp.json", "cannot be read")
    wrapped.__cause__ = StoreUnavailable("connection refused")  # how the TUF client reports a store outage
    assert is_store_outage(wrapped)
    assert is_store_outage(StoreUnavailable("down"))
    assert not is_store_outage(VerificationError("targets.json", "bad signature"))
    assert not is_store_outage(RuntimeSetupError("no keys"))
