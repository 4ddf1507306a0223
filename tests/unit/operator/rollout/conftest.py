"""A real fleet state and signed bundles in a LocalStore, and devices simulated through the fleet's own writes.

Nothing of ours is mocked: assignments go through :meth:`FleetState.assign`, install reports through
:meth:`FleetState.record_install`, health through :meth:`FleetState.write_replica_health`, as the
gateway writes them; bundles are published into a real TUF repository. Only the clock is injected.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet_core.bundle.distribution import BundleRef, build_bundles, publish_bundles
from edgefleet_core.resources.edge_model import HealthGates, RolloutPolicy, RolloutWave
from edgefleet_core.signing import KeySet, TufRepository
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import (
    DeviceHealthRecord,
    DeviceRecord,
    FleetState,
    HealthWindow,
    InstallRecord,
    ModelTotals,
    ModelWindow,
    model_key,
    totals_key,
)
from edgefleet_operator.rollout import PublishedBundles, RolloutController, RolloutTarget
from tests.support.tiny_models import tiny_matmul_bytes

NAMESPACE = "factory"
MODEL = "digits"
CPU = "cpu-small"
GPU = "gpu-large"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


@dataclass
class Clock:
    """A clock the test moves: pauses and observation windows without waiting."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def policy(*, auto_rollback: bool = True) -> RolloutPolicy:
    """10 % → 50 % → 100 % with 60 s pauses; default gates but a 30 s observation window."""
    return RolloutPolicy(
        waves=[RolloutWave(percent=10, pause="60s"), RolloutWave(percent=50, pause="60s"), RolloutWave(percent=100)],
        health_gates=HealthGates(observation_window="30s"),
        auto_rollback=auto_rollback,
    )


def target(version: str, *, device_class: str = CPU, paused: bool = False, auto_rollback: bool = True) -> RolloutTarget:
    return RolloutTarget(NAMESPACE, MODEL, device_class, version, policy(auto_rollback=auto_rollback), paused)


@dataclass
class Traffic:
    """What a device serves per window of one version: inferences, errors, p95 latency."""

    inferences: int = 100
    errors: int = 0
    p95_ms: float = 5.0


@dataclass
class SimulatedFleet:
    """Devices that act on their assignments and report, written through the fleet state's own APIs."""

    fleet: FleetState
    clock: Clock
    running: dict[str, str] = field(default_factory=dict)
    """Device name → the version it runs."""
    totals: dict[str, dict[str, ModelTotals]] = field(default_factory=dict)
    """Device name → version → cumulative totals."""
    classes: dict[str, str] = field(default_factory=dict)

    def enroll(self, count: int, device_class: str = CPU, prefix: str = "cam") -> list[str]:
        first = len(self.of_class(device_class))
        names = [f"{prefix}-{i:02d}" for i in range(first, first + count)]
        for name in names:
            self.fleet.put_device(
                DeviceRecord(
                    device_id=f"{NAMESPACE}.{name}",
                    namespace=NAMESPACE,
                    name=name,
                    device_class=device_class,
                    labels={},
                    hardware={},
                    agent_version="0.1.0",
                    cert_serial="1f",
                    cert_not_after=datetime(2027, 1, 1, tzinfo=UTC),
                    enrolled_at=self.clock.now,
                )
            )
            self.classes[name] = device_class
        return names

    def of_class(self, device_class: str) -> list[str]:
        return sorted(name for name, cls in self.classes.items() if cls == device_class)

    def assignment(self, name: str) -> tuple[str, str, int] | None:
        """(action, version, revision) of the device's assignment of the model."""
        record = self.fleet.assignments_for(NAMESPACE, name).assignments.get(model_key(NAMESPACE, MODEL))
        return None if record is None else (record.action, record.version, record.revision)

    def assigned(self, name: str) -> tuple[str, str]:
        """(action, version) of an assignment the device must have."""
        current = self.assignment(name)
        assert current is not None, f"{name} has no assignment of {MODEL}"
        return current[:2]

    def act(self, *, fail: Collection[str] = (), device_class: str = CPU) -> list[str]:
        """Every device of the class with an assignment it has not acted on installs it and reports; the names."""
        acted = []
        for name in self.of_class(device_class):
            current = self.assignment(name)
            if current is None:
                continue
            action, version, revision = current
            if self.running.get(name) == version and action == "install":
                continue
            if any(r.revision == revision for _, n, r in self.fleet.installs(NAMESPACE) if n == name):
                continue
            outcome = "failed" if name in fail else "succeeded"
            self.fleet.record_install(
                NAMESPACE,
                name,
                InstallRecord.model_validate(
                    {
                        "revision": revision,
                        "model_namespace": NAMESPACE,
                        "model_name": MODEL,
                        "from_version": self.running.get(name, ""),
                        "to_version": version,
                        "outcome": outcome,
                        "reason": "" if outcome == "succeeded" else "SelfTestFailed",
                        "message": "",
                        "failed_phase": None if outcome == "succeeded" else "self_test",
                        "finished_at": self.clock.now,
                    }
                ),
            )
            if outcome == "succeeded":
                self.running[name] = version
            acted.append(name)
        return acted

    def serve(
        self,
        traffic: dict[str, Traffic] | None = None,
        *,
        per_device: dict[str, Traffic] | None = None,
        device_class: str = CPU,
    ) -> None:
        """Each running device serves one window and the gateway flushes the class's shard.

        ``per_device`` (by name) before ``traffic`` (by version) before healthy traffic.
        """
        records = []
        for name in self.of_class(device_class):
            version = self.running.get(name)
            if version is not None:
                t = (per_device or {}).get(name) or (traffic or {}).get(version) or Traffic()
                seen = self.totals.setdefault(name, {}).get(version)
                self.totals[name][version] = ModelTotals(
                    model_namespace=NAMESPACE,
                    model_name=MODEL,
                    version=version,
                    windows=(seen.windows if seen else 0) + 1,
                    inference_count=(seen.inference_count if seen else 0) + t.inferences,
                    error_count=(seen.error_count if seen else 0) + t.errors,
                    accelerator_fallback_count=0,
                    last_p50_ms=t.p95_ms / 2,
                    last_p95_ms=t.p95_ms,
                    last_p99_ms=t.p95_ms * 1.5,
                )
            if name in self.totals:
                records.append(self._health(name, device_class))
        self.fleet.write_replica_health("gw-a", device_class, records)

    def _health(self, name: str, device_class: str) -> DeviceHealthRecord:
        totals = self.totals[name]
        window = HealthWindow(
            window_start=self.clock.now - timedelta(seconds=10),
            window_seconds=10.0,
            cpu_percent=20.0,
            memory_used_bytes=1 << 28,
            memory_total_bytes=1 << 30,
            disk_used_bytes=1 << 30,
            disk_total_bytes=1 << 34,
            models=[
                ModelWindow(
                    model_namespace=NAMESPACE,
                    model_name=MODEL,
                    version=t.version,
                    slot="a",
                    inference_count=t.inference_count,
                    error_count=t.error_count,
                    latency_p50_ms=t.last_p50_ms,
                    latency_p95_ms=t.last_p95_ms,
                    latency_p99_ms=t.last_p99_ms,
                    accelerator_fallback_count=0,
                )
                for t in totals.values()
                if t.version == self.running.get(name)
            ],
        )
        return DeviceHealthRecord(
            device_id=f"{NAMESPACE}.{name}",
            namespace=NAMESPACE,
            name=name,
            device_class=device_class,
            updated_at=self.clock.now,
            last_window=window,
            totals={totals_key(NAMESPACE, MODEL, t.version): t for t in totals.values()},
            last_install=None,
        )


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding every version's signed bundle for both classes, built once: tests copy it."""
    folder = tmp_path_factory.mktemp("published") / "store"
    store = LocalStore(folder)
    repository = TufRepository(store, KeySet.generate())
    repository.initialize()
    built = [
        bundle
        for seed, version in enumerate(VERSIONS)
        for device_class in (CPU, GPU)
        for bundle in build_bundles(
            {"model.onnx": tiny_matmul_bytes(seed)},
            BundleRef(namespace=NAMESPACE, name=MODEL, device_class=device_class),
            version,
            variant_id=f"{seed:x}" * 64,
            lineage={},
            recipe=[],
            metrics={"accuracy": 0.9},
        )
    ]
    publish_bundles(repository, built)
    return folder


@pytest.fixture
def store(published: Path, tmp_path: Path) -> LocalStore:
    shutil.copytree(published, tmp_path / "store")
    return LocalStore(tmp_path / "store")


@pytest.fixture
def fleet(store: LocalStore, clock: Clock) -> FleetState:
    return FleetState(store, clock=clock)


@pytest.fixture
def devices(fleet: FleetState, clock: Clock) -> SimulatedFleet:
    return SimulatedFleet(fleet, clock)


@pytest.fixture
def bundles(store: LocalStore) -> PublishedBundles:
    return PublishedBundles(store)


@pytest.fixture
def controller(fleet: FleetState, bundles: PublishedBundles, clock: Clock) -> RolloutController:
    return RolloutController(fleet, bundles, clock=clock)
