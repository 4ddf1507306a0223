"""The A/B slot store: pointer transitions, verification by re-hashing, leftovers of interrupted writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet_agent.errors import SlotCorrupt, SlotError
from edgefleet_agent.slots import ModelSlots, SlotPointer, SlotStore, Trial
from edgefleet_core.bundle.distribution import BundleRef, build_bundles
from edgefleet_core.bundle.manifest import BundleManifest
from tests.unit.agent.bundle_world import model_bytes


def manifest(version: str, data: bytes) -> BundleManifest:
    ref = BundleRef("vision", "digits", "cpu-small")
    [built] = build_bundles({"model.onnx": data}, ref, version, variant_id="ab" * 32, lineage={}, recipe=[], metrics={})
    return built.manifest


@pytest.fixture
def slots(tmp_path: Path) -> ModelSlots:
    return SlotStore(tmp_path / "models").model("vision", "digits")


def test_pointer_moves_through_trial_commit_and_abort(slots: ModelSlots) -> None:
    assert slots.pointer() == SlotPointer()
    assert slots.inactive_slot() == "a"
    slots.begin_trial("a", "1.0.0", 1)
    assert slots.pointer().trial == Trial(slot="a", version="1.0.0", revision=1)
    assert slots.commit() == SlotPointer(active_slot="a", active_version="1.0.0")
    assert slots.inactive_slot() == "b"
    slots.begin_trial("b", "2.0.0", 2)
    assert slots.abort_trial() == SlotPointer(active_slot="a", active_version="1.0.0")
    slots.begin_trial("b", "2.0.0", 3)
    committed = slots.commit()
    assert (committed.previous_slot, committed.previous_version) == ("a", "1.0.0")
    assert slots.fall_back() == SlotPointer(active_slot="a", active_version="1.0.0")
    with pytest.raises(SlotError, match="no trial"):
        slots.commit()


def test_verify_rehashes_every_file(slots: ModelSlots) -> None:
    data = model_bytes(0)
    slots.write_slot("a", manifest("1.0.0", data), {"model.onnx": data})
    verified = slots.verify("a", "1.0.0")
    assert verified.files == {"model.onnx": data}
    with pytest.raises(SlotCorrupt, match=r"holds version 1\.0\.0"):
        slots.verify("a", "2.0.0")
    (slots.slot_dir("a") / "model.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SlotCorrupt, match="does not match"):
        slots.verify("a")
    (slots.slot_dir("a") / "model.onnx").unlink()
    with pytest.raises(SlotCorrupt, match=r"model\.onnx"):
        slots.verify("a")
    with pytest.raises(SlotCorrupt, match="no readable manifest"):
        slots.verify("b")
    with pytest.raises(SlotError, match="not the manifest's"):
        slots.write_slot("b", manifest("1.0.0", data), {"other.onnx": data})


def test_leftovers_and_bad_pointers(slots: ModelSlots) -> None:
    slots.begin_trial("a", "1.0.0", 1)
    (slots.directory / ".slot-b.123.tmp").mkdir()
    (slots.directory / ".current.json.x.tmp").write_text("{")
    assert slots.clear_leftovers() == [".current.json.x.tmp", ".slot-b.123.tmp"]
    (slots.directory / "current.json").write_text('{"active_slot": "c"}')
    with pytest.raises(SlotError, match="not valid"):
        slots.pointer()
    (slots.directory / "current.json").write_text('{"active_slot": "a", "active_version": "1", "committed": false}')
    with pytest.raises(SlotError, match="not valid"):
        slots.pointer()
    slots.remove()
    assert not slots.directory.exists()


def test_store_lists_models_and_refuses_unsafe_names(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "models")
    assert store.models() == []
    store.model("vision", "digits").begin_trial("a", "1", 1)
    store.model("audio", "kws").begin_trial("a", "1", 1)
    assert [(m.namespace, m.name) for m in store.models()] == [("audio", "kws"), ("vision", "digits")]
    for namespace, name in (("..", "x"), ("vision", "a/b"), ("vision", ""), ("vision", ".hidden")):
        with pytest.raises(SlotError, match="not a safe folder name"):
            store.model(namespace, name)
