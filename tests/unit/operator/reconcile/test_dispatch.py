"""The reconciler with a build dispatcher: builds run elsewhere, the reconciler publishes what comes back.

The dispatcher is a stand-in at our own seam (:class:`BuildDispatcher`) that answers from a script;
everything else is real: the signed repository, the publisher, the fleet, the status.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet_core.bundle.distribution import BundleRef
from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelStatus
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState
from edgefleet_operator.reconcile import BuiltVariant, SourceResolver, SpecError, TransientError
from edgefleet_operator.reconcile.dispatch import Built, DispatchState, Failed, Running
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler
from edgefleet_operator.rollout import PublishedBundles
from tests.support.tiny_models import tiny_cnn
from tests.unit.operator.reconcile.conftest import CPU, NPU, StagedFile, device_class, edge_model, model_bytes


@dataclass
class ScriptedDispatcher:
    """Answers ``dispatch`` with the next scripted state per class (the last one repeats); records every call."""

    script: dict[str, list[DispatchState]]
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)

    def dispatch(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str, version: str) -> DispatchState:
        name = device_class.metadata.name
        self.calls.append((name, build_key, version))
        states = self.script[name]
        return states.pop(0) if len(states) > 1 else states[0]

    def release(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str) -> None:
        self.released.append((device_class.metadata.name, build_key))

    def discard_model(self, model: EdgeModel) -> None:
        self.discarded.append(model.metadata.name)


def built(seed: int = 0) -> BuiltVariant:
    data = model_bytes(tiny_cnn(seed=seed))
    digest = hashlib.sha256(data).hexdigest()
    return BuiltVariant({"model.onnx": data}, digest, {"source": digest}, [], {"sizeBytes": len(data)}, None, None, {})


def reconciler(store: LocalStore, publisher: Publisher, dispatcher: ScriptedDispatcher) -> EdgeModelReconciler:
    # A resolver with no base folder and a model whose source does not exist: the operator must not read it.
    return EdgeModelReconciler(
        publisher=publisher,
        fleet=FleetState(store),
        sources=SourceResolver(),
        bundles=PublishedBundles(store),
        dispatcher=dispatcher,
        dispatch_poll_interval=7.0,
    )


@pytest.fixture
def model(tmp_path: Path) -> EdgeModel:
    missing = StagedFile(tmp_path / "absent.onnx", (tmp_path / "absent.onnx").as_uri(), "a" * 64)
    return edge_model(missing, targets={"deviceClasses": [CPU, NPU]})


@pytest.fixture
def classes() -> list[DeviceClass]:
    return [device_class(CPU), device_class(NPU)]


def conditions(status: EdgeModelStatus) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason or "", c.message or "") for c in status.conditions or []}


def with_status(model: EdgeModel, status: EdgeModelStatus) -> EdgeModel:
    return EdgeModel.model_validate({**model.to_wire(), "status": status.to_wire()})


def test_a_running_build_keeps_the_model_reconciling_and_polls(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    dispatcher = ScriptedDispatcher({CPU: [Running("job a")], NPU: [Running("job b")]})
    result = reconciler(store, publisher, dispatcher).reconcile(model, classes)
    found = conditions(result.status)
    assert found["Reconciling"][:2] == ("True", "BuildingInJob")
    assert "DeviceClass cpu-small: building in job a" in found["Reconciling"][2]
    assert found["Optimized"][:2] == ("False", "BuildingInJob")
    assert found["Stalled"][0] == "False"
    assert result.requeue_after == 7.0
    assert {(c, v) for c, _, v in dispatcher.calls} == {(CPU, "1"), (NPU, "1")}
    assert publisher.model_versions("factory", "digits") == {}


def test_finished_builds_are_published_under_the_dispatched_version(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    dispatcher = ScriptedDispatcher({CPU: [Built(built(1), "1")], NPU: [Running("job b"), Built(built(2), "1")]})
    subject = reconciler(store, publisher, dispatcher)
    first = subject.reconcile(model, classes)
    assert [v.device_class for v in first.status.variants or []] == [CPU]
    assert "VariantPublished" in [e.reason for e in first.events]
    assert dispatcher.released == [(CPU, dispatcher.calls[0][1])]

    second = subject.reconcile(with_status(model, first.status), classes)
    # The CPU variant is published: it is adopted, not dispatched again; NPU keeps version 1 as dispatched.
    assert [c for c, _, _ in dispatcher.calls] == [CPU, NPU, NPU]
    assert {v.device_class: v.version for v in second.status.variants or []} == {CPU: "1", NPU: "1"}
    assert conditions(second.status)["Published"][0] == "True"
    assert publisher.model_versions("factory", "digits") == {CPU: ["1"], NPU: ["1"]}


def test_a_refused_build_stalls_naming_the_field_and_is_not_dispatched_again(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    refused = SpecError("spec.accuracy.maxDrop", "no candidate meets the budget")
    dispatcher = ScriptedDispatcher({CPU: [Failed(refused)], NPU: [Built(built(), "1")]})
    subject = reconciler(store, publisher, dispatcher)
    result = subject.reconcile(model, classes)
    stalled = conditions(result.status)["Stalled"]
    assert stalled[:2] == ("True", "InvalidSpec")
    assert "DeviceClass cpu-small: spec.accuracy.maxDrop: no candidate meets the budget" in stalled[2]
    assert "Stalled" in [e.reason for e in result.events]
    assert publisher.model_versions("factory", "digits") == {NPU: ["1"]}  # the other class goes on

    subject.reconcile(with_status(model, result.status), classes)
    assert [c for c, _, _ in dispatcher.calls] == [CPU, NPU]  # remembered: neither asked again


def test_a_failed_job_is_retried_with_backoff(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    dispatcher = ScriptedDispatcher(
        {CPU: [Failed(TransientError("job x failed: OOMKilled")), Running("job y")], NPU: [Running("job b")]}
    )
    subject = reconciler(store, publisher, dispatcher)
    result = subject.reconcile(model, classes)
    found = conditions(result.status)
    assert found["Reconciling"][:2] == ("True", "Retrying")
    assert "OOMKilled" in found["Reconciling"][2]
    assert result.requeue_after == 5.0  # the first retry delay, shorter than the Job poll
    assert "Retrying" in [e.reason for e in result.events]
    again = subject.reconcile(with_status(model, result.status), classes)
    assert conditions(again.status)["Reconciling"][1] == "BuildingInJob"


def test_a_taken_version_gives_the_build_a_fresh_one(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    # Version 1 of CPU was published for an older spec while this build ran for version 1.
    old = built(5)
    publisher.publish(
        _ref(CPU, "1"), old.files, build_key="b" * 64, variant_id=old.variant_id, lineage={}, recipe=[], metrics={}
    )
    dispatcher = ScriptedDispatcher({CPU: [Built(built(6), "1")], NPU: [Running("job b")]})
    result = reconciler(store, publisher, dispatcher).reconcile(model, classes)
    assert {v.device_class: v.version for v in result.status.variants or []} == {CPU: "2"}


def test_finalize_discards_the_models_builds(
    store: LocalStore, publisher: Publisher, model: EdgeModel, classes: list[DeviceClass]
) -> None:
    dispatcher = ScriptedDispatcher({CPU: [Running("a")], NPU: [Running("b")]})
    reconciler(store, publisher, dispatcher).finalize(model)
    assert dispatcher.discarded == ["digits"]


def _ref(device_class: str, version: str) -> BundleRef:
    return BundleRef("factory", "digits", device_class, version)
