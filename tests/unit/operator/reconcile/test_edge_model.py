"""The EdgeModel reconciler end to end over real parts: pipeline, signed repository, fleet state, rollouts.

The source is a real tiny CNN read through :class:`SourceResolver`, variants are built by the real
:func:`build_variant` (a GraphOptimization-only recipe keeps it to milliseconds) and published into a
real TUF repository; devices are simulated through the fleet state's own writes, as the rollout
controller's tests do. The builder is wrapped only to count calls (and, in one test, to fail one
class); the status goes through its JSON form between reconciles, as kopf stores it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from edgefleet_core.bundle.distribution import BundleRef
from edgefleet_core.bundle.publisher import PublishedVariant, Publisher
from edgefleet_core.errors import StoreUnavailable
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.lineage import VariantCache
from edgefleet_core.optimize.model_io import LoadedModel
from edgefleet_core.optimize.passes.base import Trainer
from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelStatus
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState
from edgefleet_operator.reconcile import BuiltVariant, SourceResolver, SpecError, build_variant
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, Event, ReconcileResult
from edgefleet_operator.rollout import PublishedBundles
from tests.unit.operator.reconcile.conftest import (
    CPU,
    GRAPH_ONLY,
    MODEL,
    NAMESPACE,
    StagedFile,
    device_class,
    edge_model,
)
from tests.unit.operator.rollout.conftest import Clock, SimulatedFleet, Traffic

TINY = "cpu-tiny"
"""A class with 1 KiB of memory: with a lossy recipe and no accuracy slack, no candidate is accepted."""
LOSSY = {"passes": [{"type": "WeightClustering", "weightClustering": {"bits": 1}}]}
ROLLOUT: dict[str, Any] = {
    "waves": [{"percent": 50, "pause": "5s"}, {"percent": 100}],
    "healthGates": {"observationWindow": "10s", "minReports": 1},
}
TERMINAL = frozenset({"Succeeded", "RolledBack", "Failed"})
BAD_V2 = {"2": Traffic(errors=20)}


@dataclass
class CountingBuilder:
    """The real :func:`build_variant`, counting calls per class (and their threads); ``fail`` raises instead.

    ``measure=False`` skips the pipeline and ships the source as it is: for builds that run
    concurrently, where timing noise could make the pipeline reject a candidate as slower than FP32.
    """

    measure: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self,
        model: EdgeModel,
        device_class: DeviceClass,
        source: LoadedModel,
        data: tuple[Dataset, str] | None,
        *,
        cache: VariantCache | None,
        trainer: Trainer | None,
    ) -> BuiltVariant:
        name = device_class.metadata.name
        with self.lock:
            self.calls.append((name, threading.current_thread().name))
        if name in self.fail:
            raise self.fail[name]
        if not self.measure:
            files = {"model.onnx": source.model.SerializeToString(deterministic=True)}
            digest = hashlib.sha256(files["model.onnx"]).hexdigest()
            return BuiltVariant(files, digest, {"source": source.digest}, [], {}, None, None, {})
        return build_variant(model, device_class, source, data, cache=cache, trainer=trainer)

    def built(self) -> list[str]:
        return [name for name, _ in self.calls]


@dataclass
class Harness:
    """One operator's view: the reconciler, its fleet, the classes, and devices that act on assignments."""

    reconciler: EdgeModelReconciler
    builder: CountingBuilder
    store: LocalStore
    publisher: Publisher
    fleet: FleetState
    devices: SimulatedFleet
    classes: list[DeviceClass]

    def reconcile(self, model: EdgeModel) -> tuple[EdgeModel, ReconcileResult]:
        """Reconcile and hand back the model with the new status, through JSON as the API server keeps it."""
        result = self.reconciler.reconcile(model, self.classes)
        return with_status(model, result.status), result

    def drive(
        self, model: EdgeModel, *, traffic: dict[str, Traffic] | None = None, fail: Collection[str] = ()
    ) -> tuple[EdgeModel, list[Event]]:
        """Reconcile, let the devices install and report, move the clock on; until every rollout has ended."""
        events: list[Event] = []
        for _ in range(40):
            model, result = self.reconcile(model)
            events += result.events
            phases = {r.phase for r in result.status.rollout or []}
            if phases and phases <= TERMINAL:
                return model, events
            for name in {c.metadata.name for c in self.classes}:
                self.devices.act(device_class=name, fail=fail)
                self.devices.serve(traffic, device_class=name)
            assert result.requeue_after is not None, "a rollout under way must ask to be reconciled again"
            self.devices.clock.advance(max(1.0, min(result.requeue_after, 30.0)))
        raise AssertionError(f"the rollout did not end: {model.status}")

    def store_state(self) -> dict[str, str]:
        """The sha256 of every object in the store (signed metadata, bundles, fleet records): what a write changes."""
        return {key: hashlib.sha256(self.store.get(key, max_bytes=1 << 26)).hexdigest() for key in self.store.list("")}


def with_status(model: EdgeModel, status: EdgeModelStatus) -> EdgeModel:
    return EdgeModel.model_validate({**model.to_wire(), "status": status.to_wire()})


def changed(model: EdgeModel, *, next_generation: bool = True, **spec: Any) -> EdgeModel:
    """``model`` with spec fields replaced (CRD spelling), by default as its next generation; its status kept."""
    body: dict[str, Any] = model.to_wire()
    body["spec"] = {**body["spec"], **spec}
    if next_generation:
        body["metadata"]["generation"] = (model.metadata.generation or 0) + 1
    return EdgeModel.model_validate(body)


def condition(status: EdgeModelStatus, condition_type: str) -> Condition:
    found = next((c for c in status.conditions or [] if c.type == condition_type), None)
    assert found is not None, f"no {condition_type} condition in {status}"
    return found


def reasons(events: list[Event]) -> list[str]:
    return [e.reason for e in events]


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def make_harness(
    store: LocalStore, publisher: Publisher, resolver: SourceResolver, cpu_class: DeviceClass, clock: Clock
) -> Callable[..., Harness]:
    fleet = FleetState(store, clock=clock)
    devices = SimulatedFleet(fleet, clock)

    def make(
        *,
        classes: list[DeviceClass] | None = None,
        publisher_: Publisher | None = None,
        measure: bool = True,
        **options: Any,
    ) -> Harness:
        builder = CountingBuilder(measure)
        used = publisher_ or publisher
        reconciler = EdgeModelReconciler(
            publisher=used,
            fleet=fleet,
            sources=resolver,
            bundles=PublishedBundles(store),
            builder=builder,
            clock=clock,
            **options,
        )
        return Harness(reconciler, builder, store, used, fleet, devices, classes or [cpu_class])

    return make


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    made = make_harness()
    made.devices.enroll(4, CPU)
    return made


@pytest.fixture
def model(source_file: StagedFile) -> EdgeModel:
    return edge_model(source_file, rollout=ROLLOUT)


# ------------------------------------------------------------------------------- first reconcile


def test_first_reconcile_publishes_a_variant_and_starts_the_rollout(harness: Harness, model: EdgeModel) -> None:
    updated, result = harness.reconcile(model)
    status = result.status
    assert status.observed_generation == 1
    assert status.version == "1"
    assert status.classes == 1
    assert [(v.device_class, v.version, v.bundle) for v in status.variants or []] == [
        (CPU, "1", f"{CPU}/{NAMESPACE}/{MODEL}/1/manifest.json")
    ]
    rollout = (status.rollout or [])[0]
    assert (rollout.device_class, rollout.version, rollout.phase, rollout.wave, rollout.updated) == (
        CPU,
        "1",
        "Progressing",
        1,
        2,
    )
    assert status.rollout_phase == "Progressing"
    assert reasons(result.events) == ["VariantPublished", "RolloutStarted", "WaveAssigned"]
    assert all(e.type == "Normal" for e in result.events)
    assert condition(status, "Optimized").status == "True"
    assert condition(status, "Published").status == "True"
    assert condition(status, "RolledOut").status == "False"
    assert condition(status, "Ready").status == "False"
    assert condition(status, "Reconciling").status == "True"
    assert condition(status, "Stalled").status == "False"
    assert {c.observed_generation for c in status.conditions or []} == {1}
    # The wave's devices hold the version; the others nothing yet.
    held = [harness.devices.assignment(name) for name in harness.devices.of_class(CPU)]
    assert sorted(a[:2] if a else None for a in held if a) == [("install", "1"), ("install", "1")]
    assert result.requeue_after is not None
    assert 0 < result.requeue_after <= 30
    # What kopf patches is the JSON form, and it reads back as the same status.
    assert EdgeModelStatus.model_validate(status.to_wire()) == status
    assert updated.status == status
    assert harness.builder.built() == [CPU]


def test_reconciling_again_changes_nothing_and_publishes_nothing(
    harness: Harness, make_harness: Callable[..., Harness], model: EdgeModel
) -> None:
    first, result = harness.reconcile(model)
    before = harness.store_state()
    _, repeat = harness.reconcile(first)
    assert repeat.status == result.status
    assert repeat.events == []
    assert harness.store_state() == before
    assert harness.builder.built() == [CPU]
    # A restarted operator (nothing in memory) adopts the published build: no pipeline, no write.
    restarted = make_harness()
    _, after_restart = restarted.reconcile(first)
    assert after_restart.status == result.status
    assert after_restart.events == []
    assert restarted.builder.built() == []
    assert harness.store_state() == before
    # Even with the status lost, the same version is adopted and nothing is assigned twice.
    lost = make_harness()
    _, from_scratch = lost.reconcile(model)
    assert [v.version for v in from_scratch.status.variants or []] == ["1"]
    assert lost.builder.built() == []
    assert harness.store_state() == before


def test_a_rollout_runs_to_ready(harness: Harness, model: EdgeModel) -> None:
    done, events = harness.drive(model)
    status = done.status
    assert status is not None
    assert status.rollout_phase == "Succeeded"
    for condition_type, expected in (
        ("Ready", "True"),
        ("Optimized", "True"),
        ("Published", "True"),
        ("RolledOut", "True"),
        ("Degraded", "False"),
        ("Reconciling", "False"),
        ("Stalled", "False"),
    ):
        assert condition(status, condition_type).status == expected, condition_type
    assert "WaveAdvanced" in reasons(events)
    assert reasons(events)[-1] == "RolloutSucceeded"
    assert {harness.devices.assigned(name) for name in harness.devices.of_class(CPU)} == {("install", "1")}
    assert harness.builder.built() == [CPU]
    # A settled model is still looked at now and then (devices that enroll later get the version).
    _, settled = harness.reconcile(done)
    assert settled.events == []
    assert settled.requeue_after == 300.0


# ------------------------------------------------------------------------------- spec changes


def test_a_new_build_key_gives_a_new_version_and_restarts_the_waves(harness: Harness, model: EdgeModel) -> None:
    started, _ = harness.reconcile(model)
    harness.devices.act()
    # Mid-rollout, a change of the accuracy budget: a different build for every class.
    tightened = changed(started, accuracy={"maxDrop": 0.005})
    updated, result = harness.reconcile(tightened)
    status = result.status
    assert status.observed_generation == 2
    assert status.version == "2"
    assert [v.version for v in status.variants or []] == ["2"]
    rollout = (status.rollout or [])[0]
    assert (rollout.version, rollout.phase, rollout.wave) == ("2", "Progressing", 1)
    assert reasons(result.events) == ["VariantPublished", "RolloutRestarted", "WaveAssigned"]
    assert harness.builder.built() == [CPU, CPU]
    assert harness.publisher.versions(BundleRef(NAMESPACE, MODEL, CPU)) == ["1", "2"]
    # And the same spec again is the same version: nothing more is built.
    _, repeat = harness.reconcile(updated)
    assert repeat.events == []
    assert harness.builder.built() == [CPU, CPU]


def test_a_rollout_only_change_does_not_rebuild(harness: Harness, model: EdgeModel) -> None:
    started, _ = harness.reconcile(model)
    before = harness.store_state()
    paused, result = harness.reconcile(changed(started, paused=True))
    assert result.status.rollout_phase == "Paused"
    assert reasons(result.events) == ["RolloutPaused"]
    assert condition(result.status, "RolledOut").reason == "Paused"
    assert result.requeue_after is None
    assert harness.store_state() == before
    new_policy = {**ROLLOUT, "waves": [{"percent": 25}, {"percent": 100}]}
    resumed, again = harness.reconcile(changed(paused, paused=False, rollout=new_policy))
    assert reasons(again.events)[0] == "RolloutResumed"
    assert again.status.version == "1"
    assert harness.builder.built() == [CPU]
    assert harness.publisher.versions(BundleRef(NAMESPACE, MODEL, CPU)) == ["1"]
    assert resumed.status is not None
    assert resumed.status.observed_generation == 3


def test_an_unhealthy_wave_rolls_back_and_degrades(harness: Harness, model: EdgeModel) -> None:
    on_v1, _ = harness.drive(model)
    on_v2, events = harness.drive(changed(on_v1, accuracy={"maxDrop": 0.005}), traffic=BAD_V2)
    status = on_v2.status
    assert status is not None
    rollout = (status.rollout or [])[0]
    assert (rollout.version, rollout.previous_version, rollout.phase) == ("2", "1", "RolledBack")
    assert status.rollout_phase == "RolledBack"
    degraded = condition(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "RolledBack")
    assert "ErrorRateHigh" in degraded.message
    assert CPU in degraded.message
    assert condition(status, "Ready").status == "False"
    # Nothing is left to do until the spec changes: kstatus reads it as stalled, not as in progress.
    assert (condition(status, "Stalled").status, condition(status, "Stalled").reason) == ("True", "RolledBack")
    assert condition(status, "Reconciling").status == "False"
    warnings = [e for e in events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["RolledBack"]
    assert "error rate" in warnings[0].message
    # Every device that got 2 is sent back to 1.
    held = {harness.devices.assigned(name) for name in harness.devices.of_class(CPU)}
    assert held <= {("rollback", "1"), ("install", "1")}
    assert ("rollback", "1") in held


# ------------------------------------------------------------------------------- bad specs


BAD_SPECS: dict[str, tuple[Callable[[StagedFile], dict[str, Any]], str]] = {
    "unknown-class": (lambda _: {"targets": {"deviceClasses": [CPU, "ghost"]}}, "spec.targets.deviceClasses[1]"),
    "unreadable-source": (
        lambda _: {"source": {"uri": "file:///nonexistent/model.onnx", "sha256": "0" * 64}},
        "spec.source.uri",
    ),
    "sha256-mismatch": (lambda source: {"source": {"uri": source.uri, "sha256": "f" * 64}}, "spec.source.sha256"),
    "unreachable-budget": (
        lambda _: {
            "optimization": {"recipe": LOSSY},
            "accuracy": {"maxDrop": 0.0},
            "targets": {"deviceClasses": [TINY]},
        },
        "spec.accuracy.maxDrop",
    ),
}
"""Spec fields (CRD spelling) the CRD schema accepts but no reconcile can meet, and the field the status names."""


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_stalls_naming_the_field_and_touches_nothing(
    make_harness: Callable[..., Harness], cpu_class: DeviceClass, source_file: StagedFile, case: str
) -> None:
    spec, field = BAD_SPECS[case]
    made = make_harness(classes=[cpu_class, device_class(TINY, memory="1Ki")])
    made.devices.enroll(2, CPU)
    before = made.store_state()
    bad = changed(edge_model(source_file, rollout=ROLLOUT), next_generation=False, **spec(source_file))
    stalled, result = made.reconcile(bad)
    status = result.status
    assert condition(status, "Stalled").status == "True"
    assert field in condition(status, "Stalled").message
    assert condition(status, "Ready").status == "False"
    assert condition(status, "Reconciling").status == "False"
    assert status.observed_generation == 1
    assert not status.variants
    assert not status.rollout
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Stalled")]
    assert field in result.events[0].message
    assert made.store_state() == before
    assert result.requeue_after == 300.0  # a missed DeviceClass change, a source file that appears
    # Reported once: the same problem again posts no second Event (and is not rebuilt).
    _, again = made.reconcile(stalled)
    assert again.events == []
    assert again.status == status
    assert len(made.builder.built()) <= 1


def test_a_failing_class_does_not_stop_the_others(
    make_harness: Callable[..., Harness], cpu_class: DeviceClass, source_file: StagedFile
) -> None:
    made = make_harness(classes=[cpu_class, device_class(TINY, memory="1Ki")])
    made.devices.enroll(2, CPU)
    model = edge_model(
        source_file,
        rollout=ROLLOUT,
        targets={"deviceClasses": [CPU, TINY]},
        accuracy={"maxDrop": 0.0},
        optimization={"recipe": GRAPH_ONLY, "overrides": [{"deviceClass": TINY, "recipe": LOSSY}]},
    )
    first, result = made.reconcile(model)
    status = result.status
    assert [(v.device_class, v.version) for v in status.variants or []] == [(CPU, "1")]
    assert [(r.device_class, r.phase) for r in status.rollout or []] == [(CPU, "Progressing")]
    stalled = condition(status, "Stalled")
    assert stalled.status == "True"
    assert f"DeviceClass {TINY}: spec.accuracy.maxDrop" in stalled.message
    assert condition(status, "Optimized").reason == "InvalidSpec"
    assert reasons(result.events) == ["VariantPublished", "RolloutStarted", "WaveAssigned", "Stalled"]
    assert made.publisher.model_versions(NAMESPACE, MODEL) == {CPU: ["1"]}
    # The refused class is not built again for the same inputs while the good one rolls on.
    _, again = made.reconcile(first)
    assert sorted(made.builder.built()) == [CPU, TINY]
    assert "Stalled" not in reasons(again.events)


def test_a_device_class_change_rebuilds_only_that_class(
    make_harness: Callable[..., Harness], cpu_class: DeviceClass, source_file: StagedFile
) -> None:
    made = make_harness(classes=[cpu_class, device_class("cpu-other", labels={"tier": "small"})])
    model = edge_model(source_file, rollout=ROLLOUT, targets={"selector": {"matchLabels": {"tier": "small"}}})
    first, _ = made.reconcile(model)
    assert made.publisher.model_versions(NAMESPACE, MODEL) == {"cpu-other": ["1"], CPU: ["1"]}
    # More memory for one class: the model's generation is the same, the class's build key is not.
    made.classes = [cpu_class, device_class("cpu-other", labels={"tier": "small"}, memory="2Gi")]
    _, result = made.reconcile(first)
    assert [(v.device_class, v.version) for v in result.status.variants or []] == [("cpu-other", "2"), (CPU, "1")]
    assert result.status.version == "2"
    assert made.builder.built().count(CPU) == 1
    assert made.builder.built().count("cpu-other") == 2
    # A description is not a build input.
    made.classes = [cpu_class, device_class("cpu-other", labels={"tier": "small"}, memory="2Gi", description="x")]
    made.reconciler.reconcile(first, made.classes)
    assert made.builder.built().count("cpu-other") == 2


def test_a_bad_spec_after_a_good_one_keeps_what_the_fleet_runs(
    harness: Harness, model: EdgeModel, source_file: StagedFile
) -> None:
    started, first = harness.reconcile(model)
    harness.devices.act()
    before = harness.store_state()
    broken = changed(started, source={"uri": source_file.uri, "sha256": "e" * 64})
    _, result = harness.reconcile(broken)
    status = result.status
    assert status.observed_generation == 2
    assert "spec.source.sha256" in condition(status, "Stalled").message
    assert status.variants == first.status.variants
    assert status.rollout == first.status.rollout
    assert harness.store_state() == before


def test_a_store_failure_is_retried_with_backoff(
    make_harness: Callable[..., Harness], store: LocalStore, keys: KeySet, model: EdgeModel
) -> None:
    class FlakyPublisher(Publisher):
        failures = 2

        def publish(self, ref: BundleRef, files: Any, **kwargs: Any) -> PublishedVariant:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("the store did not answer")
            return super().publish(ref, files, **kwargs)

    made = make_harness(publisher_=FlakyPublisher(store, keys))
    made.devices.enroll(2, CPU)
    first, result = made.reconcile(model)
    assert condition(result.status, "Reconciling").reason == "Retrying"
    assert condition(result.status, "Reconciling").status == "True"
    assert condition(result.status, "Stalled").status == "False"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Retrying")]
    assert result.requeue_after == 5.0
    second, again = made.reconcile(first)
    assert again.requeue_after == 10.0
    assert again.events == []  # already reported
    _, recovered = made.reconcile(second)
    assert [v.version for v in recovered.status.variants or []] == ["1"]
    assert condition(recovered.status, "Reconciling").reason == "RollingOut"
    assert recovered.requeue_after is not None
    assert recovered.requeue_after <= 30


# ------------------------------------------------------------------------------- executor


def test_builds_run_in_the_executor_one_per_class(
    make_harness: Callable[..., Harness], cpu_class: DeviceClass, source_file: StagedFile
) -> None:
    other = device_class("cpu-other")
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="build") as pool:
        made = make_harness(classes=[cpu_class, other], executor=pool, measure=False)
        model = edge_model(source_file, rollout=ROLLOUT, targets={"deviceClasses": [CPU, "cpu-other"]})
        _, result = made.reconcile(model)
    assert {thread.startswith("build") for _, thread in made.builder.calls} == {True}
    assert sorted(made.builder.built()) == ["cpu-other", CPU]
    # One spec change, one version on every class.
    assert [(v.device_class, v.version) for v in result.status.variants or []] == [("cpu-other", "1"), (CPU, "1")]
    assert reasons(result.events).count("VariantPublished") == 2


def test_the_default_builder_is_the_real_pipeline(
    store: LocalStore, publisher: Publisher, resolver: SourceResolver, cpu_class: DeviceClass, model: EdgeModel
) -> None:
    reconciler = EdgeModelReconciler(
        publisher=publisher, fleet=FleetState(store), sources=resolver, bundles=PublishedBundles(store)
    )
    result = reconciler.reconcile(model, [cpu_class])
    variant = (result.status.variants or [])[0]
    assert variant.passes == ["GraphOptimization"]
    assert variant.execution_provider == "CPUExecutionProvider"
    assert variant.digest.startswith("sha256:")
    # No devices yet: the rollout waits for them and asks to be looked at again.
    assert (result.status.rollout or [])[0].phase == "Pending"
    assert result.requeue_after == 30.0


# ------------------------------------------------------------------------------- finalize


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_finalize_removes_the_model_from_every_device(harness: Harness, model: EdgeModel, policy: str) -> None:
    done, _ = harness.drive(changed(model, artifactPolicy=policy))
    result = harness.reconciler.finalize(done)
    names = harness.devices.of_class(CPU)
    assert {harness.devices.assigned(name) for name in names} == {("remove", "1")}
    assert result.events[0].reason == "AssignmentsRemoved"
    versions = harness.publisher.model_versions(NAMESPACE, MODEL)
    if policy == "Delete":
        assert versions == {}
        assert reasons(result.events) == ["AssignmentsRemoved", "ArtifactsDeleted"]
    else:
        assert versions == {CPU: ["1"]}
        assert reasons(result.events) == ["AssignmentsRemoved"]
    # Idempotent: a second finalize assigns and deletes nothing.
    before = harness.store_state()
    again = harness.reconciler.finalize(done)
    assert again.events == []
    assert harness.store_state() == before


def test_an_unexpected_spec_error_from_the_builder_names_the_class(harness: Harness, model: EdgeModel) -> None:
    harness.builder.fail[CPU] = SpecError("spec.partition.cut", "no such tensor")
    _, result = harness.reconcile(model)
    assert condition(result.status, "Stalled").message == f"DeviceClass {CPU}: spec.partition.cut: no such tensor"


def test_reconciling_keeps_the_signed_metadata_from_lapsing(
    make_harness: Callable[..., Harness], store: LocalStore, keys: KeySet, model: EdgeModel
) -> None:
    # Devices refuse expired metadata; with nothing new to publish, the reconciler still renews it.
    later = Clock(datetime.now(UTC))
    harness = make_harness(publisher_=Publisher(store, keys, clock=later))
    first, _ = harness.reconcile(model)

    def timestamp_version() -> int:
        document = json.loads(store.get("tuf/metadata/timestamp.json", max_bytes=1 << 20))
        return int(document["signed"]["version"])

    before = timestamp_version()
    harness.reconcile(first)
    assert timestamp_version() == before  # fresh: nothing written
    later.advance(13 * 3600)  # the one-day timestamp has 11 h left
    harness.reconcile(first)
    assert timestamp_version() == before + 1
    assert harness.builder.built() == [CPU]  # renewing is no rebuild
