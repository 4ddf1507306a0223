"""The Updater against a real TUF repository: install, switch, delta, rollback, refusals, and crash recovery."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import edgefleet_agent.updater as updater_module
from edgefleet_agent.assignments import InstallResult
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_agent.slots import ModelSlots, SlotPointer, SlotStore, Trial
from edgefleet_agent.updater import CRASH_LOOP_ATTEMPTS, Updater
from edgefleet_core.bundle.distribution import BuiltBundle, BundleRef, build_bundles, publish_bundles
from edgefleet_core.bundle.selftest import make_self_test
from tests.unit.agent.bundle_world import MODEL, NAMESPACE, BundleWorld, model_bytes

INPUT = np.zeros((1, 1, 8, 8), np.float32)


class Crash(BaseException):
    """Stands for SIGKILL: nothing in the agent handles it, so the state on disk is what a kill leaves."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> BundleWorld:
    """Versions 1.0.0 and 2.0.0 (with a delta from 1.0.0), a bad 3.0.0, a slow 4.0.0, a tampered 5.0.0."""
    made = BundleWorld(tmp_path_factory.mktemp("world"))
    made.publish("1.0.0", {"model.onnx": model_bytes(0)})
    made.publish("2.0.0", {"model.onnx": model_bytes(1)}, base="1.0.0")
    # 3.0.0's self-test holds 1.0.0's outputs: what a broken build looks like on the device.
    made.publish("3.0.0", {"model.onnx": model_bytes(2)}, self_test=make_self_test({"model.onnx": model_bytes(0)}))
    made.publish("4.0.0", {"model.onnx": model_bytes(3)}, self_test=make_self_test({"model.onnx": model_bytes(3)},
                                                                                      latency_slo_ms=1e-6))  # fmt: skip
    made.publish("5.0.0", {"model.onnx": model_bytes(4)})
    for key in made.payload_keys("5.0.0"):
        data = bytearray(made.store.get(key, max_bytes=1 << 24))
        data[len(data) // 2] ^= 0xFF
        made.store.put(key, bytes(data))
    made.publish("6.0.0", {"model.onnx": model_bytes(5)}, self_test=None)
    return made


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def make_updater(world: BundleWorld, state: Path) -> Updater:
    return Updater(state, "cpu-small", ModelRuntime(), lambda: world.client(state))


@pytest.fixture
def updater(world: BundleWorld, state: Path) -> Updater:
    made = make_updater(world, state)
    assert made.recover() == []
    return made


def serving(updater: Updater) -> str:
    return updater.runtime.predict(MODEL, {"input": INPUT}, namespace=NAMESPACE).version


def pointer(state: Path) -> SlotPointer:
    return SlotStore(state / "models").model(NAMESPACE, MODEL).pointer()


def ok(result: InstallResult, reason: str = "Installed") -> InstallResult:
    assert (result.outcome, result.reason) == ("succeeded", reason), result.message
    return result


def test_install_then_switch_keeps_the_previous_version_for_rollback(
    world: BundleWorld, updater: Updater, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = ok(updater.apply(world.assignment("1.0.0", 1)))
    assert (first.from_version, first.to_version, first.active_slot) == ("", "1.0.0", "a")
    assert {"verify", "download", "decode", "activate", "self_test", "total"} <= set(first.durations)
    assert serving(updater) == "1.0.0"
    with caplog.at_level(logging.INFO, logger="edgefleet_agent.updater"):
        second = ok(updater.apply(world.assignment("2.0.0", 2)))
    assert "as a delta" in caplog.text or "a delta" in caplog.text
    assert (second.from_version, second.active_slot) == ("1.0.0", "b")
    assert serving(updater) == "2.0.0"
    assert pointer(state) == SlotPointer(
        active_slot="b", active_version="2.0.0", previous_slot="a", previous_version="1.0.0"
    )
    # The previous version stays loaded: a request may pin it.
    pinned = updater.runtime.predict(MODEL, {"input": INPUT}, version="1.0.0", namespace=NAMESPACE)
    assert pinned.version == "1.0.0"
    assert updater.installed() == [(NAMESPACE, MODEL, "2.0.0")]
    ok(updater.apply(world.assignment("2.0.0", 3)), "AlreadyActive")


def test_rollback_action_switches_to_the_other_slot_without_a_download(world: BundleWorld, updater: Updater) -> None:
    ok(updater.apply(world.assignment("1.0.0", 1)))
    ok(updater.apply(world.assignment("2.0.0", 2)))
    result = ok(updater.apply(world.assignment("1.0.0", 3, "rollback")), "SwitchedToPrevious")
    assert result.active_slot == "a"
    assert "download" not in result.durations
    assert serving(updater) == "1.0.0"
    # Rolling "back" to a version no slot holds installs it.
    ok(updater.apply(world.assignment("6.0.0", 4, "rollback")))
    assert serving(updater) == "6.0.0"


def test_failed_self_test_rolls_back_and_never_serves_the_bad_version(
    world: BundleWorld, updater: Updater, state: Path
) -> None:
    ok(updater.apply(world.assignment("2.0.0", 1)))
    result = updater.apply(world.assignment("3.0.0", 2))
    assert (result.outcome, result.reason, result.failed_phase) == ("rolled_back", "SelfTestOutputs", "self_test")
    assert "logits" in result.message
    assert result.active_slot == "a"
    assert serving(updater) == "2.0.0"
    assert pointer(state) == SlotPointer(active_slot="a", active_version="2.0.0")
    slow = updater.apply(world.assignment("4.0.0", 3))
    assert (slow.outcome, slow.reason) == ("rolled_back", "SelfTestLatency")
    assert serving(updater) == "2.0.0"
    # The trial counters are cleared once a trial ends on its own.
    assert json.loads((state / "updater.json").read_text())["attempts"] == {}


def test_first_install_failing_its_self_test_leaves_nothing_active(world: BundleWorld, updater: Updater) -> None:
    result = updater.apply(world.assignment("3.0.0", 1))
    assert (result.outcome, result.active_slot) == ("rolled_back", None)
    assert updater.installed() == []
    assert updater.runtime.served() == []


def test_bundle_without_self_test_data_is_loaded_and_run_once(world: BundleWorld, updater: Updater) -> None:
    ok(updater.apply(world.assignment("6.0.0", 1)))
    assert serving(updater) == "6.0.0"


def test_tampered_payload_is_refused_and_never_written(world: BundleWorld, updater: Updater, state: Path) -> None:
    ok(updater.apply(world.assignment("1.0.0", 1)))
    result = updater.apply(world.assignment("5.0.0", 2))
    assert result.outcome == "refused_verification", result
    assert result.reason == "LengthOrHashMismatchError"
    assert serving(updater) == "1.0.0"
    assert SlotStore(state / "models").model(NAMESPACE, MODEL).manifest("b") is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bundle_sha256": "0" * 64}, "BundleDigestMismatch"),
        ({"target_paths": ("cpu-big/vision/digits/1.0.0/manifest.json",)}, "WrongTargetPath"),
        ({"target_paths": ()}, "WrongTargetPath"),
        ({"version": "9.9.9", "target_paths": ("cpu-small/vision/digits/9.9.9/manifest.json",)}, "NotPublished"),
    ],
)
def test_assignments_that_do_not_match_signed_metadata_are_refused(
    world: BundleWorld, updater: Updater, change: dict[str, object], reason: str
) -> None:
    import dataclasses

    result = updater.apply(dataclasses.replace(world.assignment("1.0.0", 1), **change))  # type: ignore[arg-type]
    assert (result.outcome, result.reason, result.failed_phase) == ("refused_verification", reason, "verify")
    assert updater.installed() == []


def test_out_of_space_and_superseded(world: BundleWorld, updater: Updater) -> None:
    import dataclasses

    huge = dataclasses.replace(world.assignment("1.0.0", 1), bundle_length=1 << 62)
    assert (updater.apply(huge).outcome, updater.apply(huge).reason) == ("failed", "OutOfSpace")
    superseded = updater.apply(world.assignment("1.0.0", 2), cancelled=lambda: True)
    assert (superseded.outcome, superseded.reason) == ("failed", "Superseded")
    assert updater.installed() == []


def test_remove_forgets_both_slots(world: BundleWorld, updater: Updater, state: Path) -> None:
    ok(updater.apply(world.assignment("1.0.0", 1)))
    ok(updater.apply(world.assignment("1.0.0", 2, "remove")), "Removed")
    assert updater.installed() == []
    assert not (state / "models" / NAMESPACE / MODEL).exists()
    assert updater.runtime.status(NAMESPACE) == []


# --- crash recovery ------------------------------------------------------------------------------


def crash_at(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise Crash(name)

    monkeypatch.setattr(target, name, crash)


@pytest.mark.parametrize(
    "phase",
    ["download", "write_slot", "begin_trial", "self_test", "commit", "activate"],
)
def test_recover_after_a_crash_in_each_phase_serves_a_verified_version(
    world: BundleWorld, state: Path, phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_updater(world, state)
    ok(first.apply(world.assignment("1.0.0", 1)))
    with monkeypatch.context() as patch:
        if phase == "download":
            crash_at(patch, updater_module, "fetch_bundle")
        elif phase == "write_slot":
            # The slot's staging folder is written, then the process dies before the rename.
            def half_written(self: object, slot: str, *args: object) -> None:
                staging = state / "models" / NAMESPACE / MODEL / f".slot-{slot}.x1.tmp"
                staging.mkdir()
                (staging / "model.onnx").write_bytes(b"half")
                raise Crash(phase)

            patch.setattr("edgefleet_agent.slots.ModelSlots.write_slot", half_written)
        elif phase in ("begin_trial", "commit"):
            crash_at(patch, __import__("edgefleet_agent.slots").slots.ModelSlots, phase)
        else:
            crash_at(patch, first.runtime, phase)
        with pytest.raises(Crash):
            first.apply(world.assignment("2.0.0", 2))
    restarted = make_updater(world, state)
    assert restarted.recover() == []
    expected = "2.0.0" if phase == "activate" else "1.0.0"  # a crash after commit keeps the new version
    assert serving(restarted) == expected
    assert not [p.name for p in (state / "models" / NAMESPACE / MODEL).iterdir() if p.name.startswith(".")]
    assert pointer(state).trial is None
    # The update is retried and finishes.
    result = restarted.apply(world.assignment("2.0.0", 2))
    assert result.outcome == "succeeded"
    assert serving(restarted) == "2.0.0"


def test_a_version_that_kills_the_agent_in_its_self_test_is_given_up(
    world: BundleWorld, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(make_updater(world, state).apply(world.assignment("1.0.0", 1)))
    for attempt in range(CRASH_LOOP_ATTEMPTS):
        agent = make_updater(world, state)
        assert agent.recover() == []
        with monkeypatch.context() as patch:
            crash_at(patch, agent.runtime, "self_test")
            with pytest.raises(Crash):
                agent.apply(world.assignment("2.0.0", 7))
        assert pointer(state).trial == Trial(slot="b", version="2.0.0", revision=7), attempt
    agent = make_updater(world, state)
    [looped] = agent.recover()
    assert (looped.outcome, looped.reason, looped.revision, looped.to_version) == ("failed", "CrashLoop", 7, "2.0.0")
    assert serving(agent) == "1.0.0"
    again = agent.apply(world.assignment("2.0.0", 7))
    assert (again.outcome, again.reason) == ("failed", "CrashLoop")
    # A newer revision of the same version is a fresh decision by the control plane: tried again.
    ok(agent.apply(world.assignment("2.0.0", 8)))


def test_recover_falls_back_when_the_active_slot_is_corrupt(world: BundleWorld, state: Path) -> None:
    agent = make_updater(world, state)
    ok(agent.apply(world.assignment("1.0.0", 1)))
    ok(agent.apply(world.assignment("2.0.0", 2)))
    model_file = state / "models" / NAMESPACE / MODEL / "slot-b" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    restarted = make_updater(world, state)
    assert restarted.recover() == []
    assert serving(restarted) == "1.0.0"
    assert pointer(state) == SlotPointer(active_slot="a", active_version="1.0.0")
    # Both slots damaged: nothing is served, the model shows as unavailable, an install repairs it.
    (state / "models" / NAMESPACE / MODEL / "slot-a" / "model.onnx").write_bytes(b"tampered")
    broken = make_updater(world, state)
    assert broken.recover() == []
    assert broken.installed() == []
    [status] = broken.runtime.status(NAMESPACE)
    assert status.state == "unavailable"
    ok(broken.apply(world.assignment("2.0.0", 3)))
    assert serving(broken) == "2.0.0"


# --- review fixes: unexpected errors, phases, pinned manifests, lock-free reads ------------------


def test_an_unexpected_self_test_error_rolls_back_and_keeps_the_crash_counter(
    world: BundleWorld, updater: Updater, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise KeyError("zz")

    monkeypatch.setattr(updater.runtime, "self_test", explode)
    for attempt in range(CRASH_LOOP_ATTEMPTS):
        result = updater.apply(world.assignment("1.0.0", 7))
        assert (result.outcome, result.reason, result.failed_phase) == ("rolled_back", "SelfTestError", "self_test")
        assert "KeyError" in result.message
        attempts = json.loads((state / updater_module.ATTEMPTS_FILE).read_text())["attempts"]
        assert attempts == {f"{NAMESPACE}/{MODEL}@7": attempt + 1}
    result = updater.apply(world.assignment("1.0.0", 7))
    assert (result.outcome, result.reason, result.failed_phase) == ("failed", "CrashLoop", "self_test")
    assert updater.installed() == []


def test_every_failure_names_a_phase(world: BundleWorld, updater: Updater) -> None:
    import dataclasses

    huge = dataclasses.replace(world.assignment("1.0.0", 1), bundle_length=1 << 62)
    bad_name = dataclasses.replace(world.assignment("1.0.0", 2), model_name="..")
    superseded = updater.apply(world.assignment("1.0.0", 3), cancelled=lambda: True)
    for result in (updater.apply(huge), updater.apply(bad_name), superseded):
        assert result.outcome == "failed"
        assert result.failed_phase == "download", result


def test_a_state_write_failure_names_the_decode_phase(
    world: BundleWorld, updater: Updater, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelSlots, "write_slot", full)
    result = updater.apply(world.assignment("1.0.0", 1))
    assert (result.outcome, result.reason, result.failed_phase) == ("failed", "OutOfSpace", "decode")


def test_a_delta_whose_manifest_differs_from_the_pinned_one_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = BundleWorld(tmp_path / "world")
    made.publish("1.0.0", {"model.onnx": model_bytes(0)})
    files = {"model.onnx": model_bytes(1)}
    ref = BundleRef(NAMESPACE, MODEL, "cpu-small")

    def build(test: object) -> list[BuiltBundle]:
        return build_bundles(
            files, ref, "2.0.0", variant_id="ab" * 32, lineage={}, recipe=[], metrics={},
            base=("1.0.0", made.published["1.0.0"]), self_test=test,  # type: ignore[arg-type]
        )  # fmt: skip

    honest, other = build(make_self_test(files)), build(None)
    assert len(honest) == len(other) == 2
    # Signed, but its delta manifest carries another self-test than the full manifest the assignment pins.
    publish_bundles(made.repo, [honest[0], other[1]])
    made.published["2.0.0"] = files
    state = tmp_path / "state"
    updater = make_updater(made, state)
    ok(updater.apply(made.assignment("1.0.0", 1)))
    with caplog.at_level(logging.INFO, logger="edgefleet_agent.updater"):
        ok(updater.apply(made.assignment("2.0.0", 2)))
    assert "fetched in full" in caplog.text
    assert "fetched a delta" not in caplog.text
    assert SlotStore(state / "models").model(NAMESPACE, MODEL).manifest("b") == honest[0].manifest


def test_a_matching_delta_is_still_used(world: BundleWorld, updater: Updater, caplog: pytest.LogCaptureFixture) -> None:
    ok(updater.apply(world.assignment("1.0.0", 1)))
    with caplog.at_level(logging.INFO, logger="edgefleet_agent.updater"):
        ok(updater.apply(world.assignment("2.0.0", 2)))
    assert "fetched a delta" in caplog.text


def test_installed_does_not_wait_for_an_apply_in_progress(world: BundleWorld, updater: Updater) -> None:
    import threading

    ok(updater.apply(world.assignment("1.0.0", 1)))
    answer: list[list[tuple[str, str, str]]] = []
    with updater._lock:  # an apply holds it for its whole length
        reader = threading.Thread(target=lambda: answer.append(updater.installed()))
        reader.start()
        reader.join(5)
    assert answer == [[(NAMESPACE, MODEL, "1.0.0")]]


def test_transport_and_verification_failures_are_told_apart_by_type() -> None:
    from tuf.api.exceptions import DownloadError, DownloadLengthMismatchError, UnsignedMetadataError

    from edgefleet_core.errors import VerificationError

    def classify(cause: Exception | None) -> tuple[str, str]:
        error = VerificationError("x", "DownloadError: looks like transport")
        error.__cause__ = cause
        failure = updater_module._verification_failure(error, "verify")
        return failure.outcome, failure.reason

    assert classify(DownloadError("gone")) == ("failed", "DownloadFailed")
    assert classify(DownloadLengthMismatchError("long")) == ("refused_verification", "DownloadLengthMismatchError")
    assert classify(UnsignedMetadataError("bad")) == ("refused_verification", "UnsignedMetadataError")
    assert classify(None) == ("refused_verification", "NotPublished")
