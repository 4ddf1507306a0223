"""EdgeModels at each phase of their life, with the status the real reconciler writes for that phase.

Everything that decides the status is real: :class:`EdgeModelReconciler`, the signed repository, the
fleet state and the rollout controller; devices act and report through the fleet state's own writes
(:class:`SimulatedFleet`), and the clock is injected so that every run writes the same status. The
builder ships the source as it is (no pipeline timing in the status), and one phase uses a build
dispatcher whose builds never finish; both are the reconciler's own seams.

The objects are what ``kubectl get edgemodel -o yaml`` shows: apiVersion, kind, metadata (with
``generation``, and ``deletionTimestamp`` when deleting), spec and status.

``docs/gitops/testdata/*.yaml`` (the Argo CD health check's test inputs) are these objects; the tests
check that the files still match what the reconciler writes. Rewrite them after a status change with::

    .venv/bin/python -m tests.unit.gitops.samples docs/gitops/testdata
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import yaml

from edgefleet_core.bundle.distribution import BundleRef
from edgefleet_core.bundle.publisher import PublishedVariant, Publisher
from edgefleet_core.errors import StoreUnavailable
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelStatus
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState
from edgefleet_operator.reconcile import SourceResolver
from edgefleet_operator.reconcile.dispatch import DispatchState, Running
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler
from edgefleet_operator.rollout import PublishedBundles
from tests.support.tiny_models import tiny_cnn
from tests.unit.operator.reconcile.conftest import CPU, NPU, StagedFile, device_class, edge_model, model_bytes, stage
from tests.unit.operator.reconcile.test_edge_model import BAD_V2, ROLLOUT, CountingBuilder, Harness, changed
from tests.unit.operator.rollout.conftest import Clock, SimulatedFleet, Traffic

START: Final = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DELETED_AT: Final = "2026-11-01T13:00:00Z"
SOURCE_URI: Final = "file://./model.onnx"
"""Relative to the world's folder (local mode), so that no temporary path appears in a sample."""

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------- the world


class _FailingPublisher(Publisher):
    """The store refuses every publish: the reconciler retries with backoff."""

    def publish(self, ref: BundleRef, files: Any, **kwargs: Any) -> PublishedVariant:
        raise StoreUnavailable("the store did not answer (connection refused)")


class _NeverFinishes:
    """A build dispatcher whose builds run on and on (a Kubernetes Job that has not finished)."""

    def dispatch(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str, version: str) -> DispatchState:
        return Running(f"Job edgefleet-build-{model.metadata.name}-{device_class.metadata.name}")

    def release(self, model: EdgeModel, device_class: DeviceClass, *, build_key: str) -> None:
        return None

    def discard_model(self, model: EdgeModel) -> None:
        return None


def _world(folder: Path, *, failing_store: bool = False, dispatching: bool = False, devices: int = 4) -> Harness:
    """A fresh operator, repository and fleet in ``folder``: ``devices`` devices of class ``CPU``."""
    (folder / "store").mkdir(parents=True)
    store = LocalStore(folder / "store")
    publisher = (_FailingPublisher if failing_store else Publisher)(store, KeySet.generate())
    publisher.ensure_initialized()
    clock = Clock(START)
    fleet = FleetState(store, clock=clock)
    fleet_devices = SimulatedFleet(fleet, clock)
    fleet_devices.enroll(devices, CPU)
    builder = CountingBuilder(measure=False)
    reconciler = EdgeModelReconciler(
        publisher=publisher,
        fleet=fleet,
        sources=SourceResolver(base_dir=folder),
        bundles=PublishedBundles(store),
        builder=builder,
        clock=clock,
        dispatcher=_NeverFinishes() if dispatching else None,
    )
    classes = [device_class(CPU, labels={"tier": "small"}), device_class(NPU, accelerator=True)]
    return Harness(reconciler, builder, store, publisher, fleet, fleet_devices, classes)


def _model(folder: Path, **spec: Any) -> EdgeModel:
    folder.mkdir(parents=True, exist_ok=True)
    staged = stage(folder / "model.onnx", model_bytes(tiny_cnn()))
    return edge_model(StagedFile(staged.path, SOURCE_URI, staged.sha256), rollout=ROLLOUT, **spec)


def _object(model: EdgeModel, status: EdgeModelStatus | None) -> Obj:
    """The object as the API server returns it."""
    body: Obj = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", **model.to_wire()}
    body.pop("status", None)
    body["metadata"] = {k: v for k, v in body["metadata"].items() if v not in ({}, None)}
    if status is not None:
        body["status"] = status.to_wire()
    return body


# ---------------------------------------------------------------------------------- the phases


def _no_status(folder: Path) -> Obj:
    # Just applied: the operator has not written anything yet.
    return _object(_model(folder), None)


def _building(folder: Path) -> Obj:
    harness = _world(folder, dispatching=True)
    _, result = harness.reconcile(_model(folder))
    return _object(_model(folder), result.status)


def _rolling_out(folder: Path) -> Obj:
    harness = _world(folder)
    model, _ = harness.reconcile(_model(folder))
    return _object(model, model.status)


def _no_devices(folder: Path) -> Obj:
    # Published, but no device of the class has enrolled yet: the rollout waits for them.
    harness = _world(folder, devices=0)
    model, _ = harness.reconcile(_model(folder))
    return _object(model, model.status)


def _rolled_out(folder: Path) -> Obj:
    harness = _world(folder)
    model, _ = harness.drive(_model(folder))
    return _object(model, model.status)


def _new_generation(folder: Path) -> Obj:
    # Rolled out, then a spec change the operator has not seen yet (generation 2, observed 1).
    harness = _world(folder)
    model, _ = harness.drive(_model(folder))
    return _object(changed(model, accuracy={"maxDrop": 0.005}), model.status)


def _paused(folder: Path) -> Obj:
    harness = _world(folder)
    started, _ = harness.reconcile(_model(folder))
    paused, _ = harness.reconcile(changed(started, paused=True))
    return _object(paused, paused.status)


def _invalid_spec(folder: Path) -> Obj:
    harness = _world(folder)
    model, _ = harness.reconcile(_model(folder, targets={"deviceClasses": [CPU, "ghost"]}))
    return _object(model, model.status)


def _rolled_back(folder: Path) -> Obj:
    # Version 1 rolled out; version 2's first wave fails its health gate and goes back to 1.
    harness = _world(folder)
    on_v1, _ = harness.drive(_model(folder))
    on_v2, _ = harness.drive(changed(on_v1, accuracy={"maxDrop": 0.005}), traffic=BAD_V2)
    return _object(on_v2, on_v2.status)


def _rollout_failed(folder: Path) -> Obj:
    # The first version fails its health gate: nothing to roll back to.
    harness = _world(folder)
    model, _ = harness.drive(_model(folder), traffic={"1": Traffic(errors=20)})
    return _object(model, model.status)


def _retrying(folder: Path) -> Obj:
    harness = _world(folder, failing_store=True)
    model, _ = harness.reconcile(_model(folder))
    return _object(model, model.status)


def _deleting(folder: Path) -> Obj:
    # Deleted: the API server set deletionTimestamp (and bumped the generation); the finalizer runs.
    harness = _world(folder)
    model, _ = harness.drive(_model(folder))
    result = harness.reconciler.finalize(model)
    body = _object(model, result.status)
    metadata = body["metadata"]
    metadata["generation"] += 1
    metadata["deletionTimestamp"] = DELETED_AT
    metadata["finalizers"] = ["edgefleet.io/finalizer"]
    return body


PHASES: Final[dict[str, Callable[[Path], Obj]]] = {
    "progressing_no_status": _no_status,
    "progressing_building": _building,
    "progressing_rolling_out": _rolling_out,
    "progressing_no_devices": _no_devices,
    "progressing_new_generation": _new_generation,
    "progressing_retrying": _retrying,
    "progressing_deleting": _deleting,
    "suspended_paused": _paused,
    "healthy_rolled_out": _rolled_out,
    "degraded_invalid_spec": _invalid_spec,
    "degraded_rolled_back": _rolled_back,
    "degraded_rollout_failed": _rollout_failed,
}
"""Sample name (Argo CD's testdata naming: expected health, then what happened) → how to produce it."""


def produce(workdir: Path) -> dict[str, Obj]:
    """Every phase's object, each from its own fresh world under ``workdir``."""
    return {name: make(workdir / name) for name, make in PHASES.items()}


def dump(body: Obj) -> str:
    return yaml.safe_dump(body, sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str]) -> int:
    """Write each sample to ``<folder>/<name>.yaml``."""
    if len(argv) != 1:
        print("usage: python -m tests.unit.gitops.samples FOLDER", file=sys.stderr)
        return 2
    target = Path(argv[0])
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name, body in produce(Path(work)).items():
            header = "# Produced by the real reconciler: python -m tests.unit.gitops.samples docs/gitops/testdata\n"
            (target / f"{name}.yaml").write_text(header + dump(body), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
