"""Shared pieces of the control-plane fault tests (issue 10): operator processes, simulated devices, checks.

- :func:`start_operator`: ``edgefleet operator run`` as a real process, with failpoints in its environment.
- :class:`SimulatedDevices`: devices that act on their assignments and report health, written through
  the fleet state's own APIs exactly as the gateway writes them (so the operator's rollouts finish
  without agent processes); a background thread, polled, never a fixed sleep.
- :func:`repository_findings`: what the signed repository holds for one model, verified as a device
  verifies it (fresh TUF client from the trusted root, every byte of every bundle), and what the
  store holds that the signed metadata does not list (half-written targets).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet_core.bundle.distribution import BundleRef, fetch_bundle
from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.fetcher import StoreFetcher
from edgefleet_core.store.base import ArtifactStore
from edgefleet_core.store.url import open_store
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
from edgefleet_operator.operator_cli import READY_LINE
from tests.support.fleet import Process
from tests.support.fleet import wait_for as poll
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY
from tests.support.tiny_models import tiny_cnn

JsonObject = dict[str, Any]
OPERATOR = [sys.executable, "-m", "edgefleet_operator.operator_cli"]
_READY = re.compile(re.escape(READY_LINE) + r" identity=(\S+)")
MODEL = "digits"
CLASSES = ("cpu-a", "cpu-b")
FAST_ROLLOUT: JsonObject = {
    "waves": [{"percent": 50}, {"percent": 100}],
    "healthGates": {"observationWindow": "0s", "minReports": 1},
}
"""Two waves (so a kill can fall between them), gates the simulated devices pass at once."""


# ---------------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class ControlSite:
    """The store (signed repository + fleet state) and the signing keys of one test.

    ``store_url`` is what the processes are given; ``endpoint`` is where the test itself reaches an
    S3 store (the server directly, while the processes may go through a proxy that cuts them off).
    """

    folder: Path
    store_url: str = ""
    endpoint: str | None = None

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    @property
    def url(self) -> str:
        return self.store_url or (self.folder / "store").as_uri()

    @classmethod
    def create(cls, folder: Path, store_url: str = "", endpoint: str | None = None) -> ControlSite:
        site = cls(folder, store_url, endpoint)
        KeySet.generate().save(site.keys)
        return site

    def open(self) -> ArtifactStore:
        return open_store(self.url, endpoint=self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)

    def publisher(self) -> Publisher:
        return Publisher(self.open(), KeySet.load(self.keys))

    def fleet(self) -> FleetState:
        return FleetState(self.open())

    def published(self, namespace: str, model: str = MODEL) -> dict[str, list[str]] | None:
        """Class → versions published; ``None`` while the repository is mid-write or absent."""
        try:
            return self.publisher().model_versions(namespace, model)
        except EdgeFleetError:
            return None


# ---------------------------------------------------------------------------------- operator processes


def start_operator(name: str, folder: Path, args: list[str], *, failpoints: str = "") -> Process:
    """``edgefleet operator run ARGS`` as a process (``EDGEFLEET_FAILPOINTS=failpoints``); waits for its ready line."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    offset = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGEFLEET_FAILPOINTS": failpoints}
    with log.open("ab") as out:
        popen = subprocess.Popen([*OPERATOR, "run", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    process = Process(name, list(args), log, popen)

    def ready() -> re.Match[str] | None:
        if popen.poll() is not None:
            raise AssertionError(f"{name} exited with {popen.returncode}\n{process.output()[offset:]}")
        return _READY.search(process.output()[offset:])

    try:
        process.match = poll(f"{name} to be ready", ready, timeout=60)
    except BaseException:
        process.kill()
        raise
    return process


@contextlib.contextmanager
def stopped_at_exit(processes: list[Process]) -> Iterator[list[Process]]:
    """Every process put in the list is killed at the end, whatever happened (kills by our own pid only)."""
    try:
        yield processes
    finally:
        for process in processes:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                process.kill()


def died_by_sigkill(process: Process, failpoint: str, *, timeout: float = 60.0) -> None:
    """Wait until ``process`` killed itself at ``failpoint``: SIGKILL, and its log names the failpoint."""
    poll(f"{process.name} to die at {failpoint}", lambda: not process.alive(), timeout=timeout)
    assert process.popen.returncode == -9, (process.popen.returncode, process.output()[-3000:])
    assert f"failpoint {failpoint}: kill" in process.output(), process.output()[-3000:]


# ---------------------------------------------------------------------------------- resources


def device_class(name: str) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"cpu": {"arch": "x86_64", "cores": 4}, "memory": "1Gi", "precisions": ["fp32"],
                 "selector": {"matchLabels": {"edgefleet.io/class": name}}},
    }  # fmt: skip


def edge_model(namespace: str, uri: str, sha256: str, **spec: Any) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": MODEL, "namespace": namespace},
        "spec": {"source": {"uri": uri, "sha256": sha256}, "targets": {"deviceClasses": list(CLASSES)},
                 "optimization": {"recipe": {"passes": [{"type": "GraphOptimization"}]}},
                 "rollout": FAST_ROLLOUT, **spec},
    }  # fmt: skip


def condition(obj: JsonObject, kind: str) -> JsonObject | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def is_true(obj: JsonObject, kind: str) -> bool:
    found = condition(obj, kind)
    return found is not None and found["status"] == "True"


def status_variants(obj: JsonObject) -> dict[str, str]:
    """Device class → variant version in the status."""
    return {v["deviceClass"]: v["version"] for v in obj.get("status", {}).get("variants", [])}


# ---------------------------------------------------------------------------------- simulated devices


@dataclass
class SimulatedDevices:
    """Devices of :data:`CLASSES` in some namespaces that install what they are assigned and report health.

    Written through :meth:`FleetState.record_install` and :meth:`FleetState.write_replica_health`, as
    the gateway writes them: the operator sees a fleet that answers, without agent processes.
    """

    fleet: FleetState
    per_class: int = 2
    devices: list[tuple[str, str, str]] = field(default_factory=list)
    """(namespace, name, class)."""
    running: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def enroll(self, namespace: str) -> None:
        now = datetime.now(UTC)
        for cls in CLASSES:
            for index in range(self.per_class):
                name = f"{cls}-{index}"
                self.fleet.put_device(
                    DeviceRecord(device_id=f"{namespace}.{name}", namespace=namespace, name=name, device_class=cls,
                                 labels={}, hardware={}, agent_version="0.1.0", cert_serial="1f",
                                 cert_not_after=now + timedelta(days=30), enrolled_at=now)
                )  # fmt: skip
                self.devices.append((namespace, name, cls))

    def act_once(self) -> None:
        """Each device acts on a new install assignment; then each class's health shard is written."""
        reported = {
            (ns, name, r.revision) for ns in {d[0] for d in self.devices} for _, name, r in self.fleet.installs(ns)
        }
        for namespace, name, _ in list(self.devices):
            held = self.fleet.assignments_for(namespace, name).assignments.get(model_key(namespace, MODEL))
            if held is None or held.action != "install" or (namespace, name, held.revision) in reported:
                continue
            self.fleet.record_install(namespace, name, InstallRecord.model_validate({
                "revision": held.revision, "model_namespace": namespace, "model_name": MODEL,
                "from_version": self.running.get((namespace, name), ""), "to_version": held.version,
                "outcome": "succeeded", "reason": "", "message": "", "failed_phase": None,
                "finished_at": datetime.now(UTC),
            }))  # fmt: skip
            self.running[(namespace, name)] = held.version
        for cls in CLASSES:
            records = [
                self._health(ns, name, cls) for ns, name, c in self.devices if c == cls and (ns, name) in self.running
            ]
            if records:
                self.fleet.write_replica_health("sim", cls, records)

    def _health(self, namespace: str, name: str, cls: str) -> DeviceHealthRecord:
        version = self.running[(namespace, name)]
        now = datetime.now(UTC)
        totals = ModelTotals(model_namespace=namespace, model_name=MODEL, version=version, windows=1,
                             inference_count=100, error_count=0, accelerator_fallback_count=0,
                             last_p50_ms=1.0, last_p95_ms=2.0, last_p99_ms=3.0)  # fmt: skip
        window = HealthWindow(
            window_start=now - timedelta(seconds=1), window_seconds=1.0, cpu_percent=10.0,
            memory_used_bytes=1 << 28, memory_total_bytes=1 << 30, disk_used_bytes=1 << 30, disk_total_bytes=1 << 34,
            models=[ModelWindow(model_namespace=namespace, model_name=MODEL, version=version, slot="a",
                                inference_count=100, error_count=0, latency_p50_ms=1.0, latency_p95_ms=2.0,
                                latency_p99_ms=3.0, accelerator_fallback_count=0)],
        )  # fmt: skip
        return DeviceHealthRecord(
            device_id=f"{namespace}.{name}", namespace=namespace, name=name, device_class=cls, updated_at=now,
            last_window=window, totals={totals_key(namespace, MODEL, version): totals}, last_install=None,
        )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.act_once()
            except EdgeFleetError as exc:  # a record mid-write by the operator: the next round reads it whole
                self.errors.append(exc)
            self._stop.wait(0.1)

    def __enter__(self) -> SimulatedDevices:
        self._thread = threading.Thread(target=self._run, name="simulated-devices", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def assignment_revisions(fleet: FleetState, namespace: str) -> Counter[str]:
    """Device name → how many assignment revisions touched it (a duplicated wave shows as one too many)."""
    counts: Counter[str] = Counter()
    for revision in range(1, fleet.head_revision() + 1):
        changed = fleet.changed_devices(revision - 1, revision)
        assert changed is not None
        counts.update(name for ns, name in changed if ns == namespace)
    return counts


# ---------------------------------------------------------------------------------- the signed repository


@dataclass(frozen=True)
class RepositoryFindings:
    """What the store holds for one model, read as a device reads it."""

    versions: dict[str, list[str]]
    """Class → versions with a full bundle, each verified byte for byte."""
    unlisted: list[str]
    """Files under the model's target folders that no signed target names (half-written publishes)."""


def repository_findings(site: ControlSite, namespace: str, model: str = MODEL) -> RepositoryFindings:
    """Refresh a fresh TUF client from the trusted root, verify every bundle of ``model``, find unlisted files."""
    store = site.open()
    root = site.publisher().trusted_root()
    with tempfile.TemporaryDirectory() as metadata:
        client = TufClient(StoreFetcher(store, "tuf/"), root, Path(metadata))
        client.refresh()  # verifies root, timestamp, snapshot and targets: versions and signatures consistent
        listed = client.targets_for("")
        versions = site.publisher().model_versions(namespace, model)
        for cls, found in versions.items():
            for version in found:
                fetch_bundle(client, BundleRef(namespace, model, cls, version), refresh=False)
    names = {
        f"{info.path.rpartition('/')[0]}/{info.hashes['sha256']}.{info.path.rpartition('/')[2]}" for info in listed
    }
    prefix = "tuf/targets/"
    stored = {key.removeprefix(prefix) for key in store.list(prefix)}
    stored = {key for key in stored if key.split("/")[1:3] == [namespace, model]}
    return RepositoryFindings(versions, sorted(stored - names))


# ---------------------------------------------------------------------------------- shared checks


def write_source(folder: Path, seed: int = 1) -> tuple[str, str]:
    """The tiny CNN written to ``folder``: (URI, sha256) as an EdgeModel names it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cnn-{seed}.onnx"
    data = serialize(tiny_cnn(seed=seed))
    path.write_bytes(data)
    return path.as_uri(), hashlib.sha256(data).hexdigest()


def operator_args(
    site: ControlSite, server_url: str, namespaces: list[str], *, endpoint: str | None = None
) -> list[str]:
    """``operator run`` options: the site's store (through ``endpoint`` when given), fast rollout polling."""
    scope = [a for ns in namespaces for a in ("-n", ns)]
    reach = ["--endpoint", endpoint] if endpoint is not None else []
    return ["--store", site.url, *reach, "--keys", str(site.keys), "--server", server_url, *scope,
            "--standalone", "--workers", "2", "--rollout-poll-seconds", "0.2", "--resync-seconds", "5"]  # fmt: skip


def rolled_out(found: JsonObject | None) -> bool:
    """Ready, for the current generation, with every class's rollout done."""
    if found is None or not is_true(found, "Ready"):
        return False
    status: JsonObject = found["status"]
    current = status.get("observedGeneration") == found["metadata"]["generation"]
    return current and status.get("rolloutPhase") == "Succeeded"


def published_once_problems(site: ControlSite, namespace: str, found: JsonObject) -> list[str]:
    """What is wrong with a converged model: a class without exactly one verified version, a store file no
    signed target lists, a device not assigned its class's version exactly once, a status that disagrees."""
    findings = repository_findings(site, namespace)
    fleet = site.fleet()
    revisions = assignment_revisions(fleet, namespace)
    problems = [f"unlisted file {path}" for path in findings.unlisted]
    for cls in CLASSES:
        versions = findings.versions.get(cls, [])
        if len(versions) != 1:
            problems.append(f"{cls}: versions {versions}, not exactly one")
    published = {cls: versions[-1] for cls, versions in findings.versions.items() if versions}
    for record in fleet.list_devices(namespace):
        held = fleet.assignments_for(namespace, record.name).assignments.get(model_key(namespace, MODEL))
        got = None if held is None else (held.action, held.version)
        if got != ("install", published.get(record.device_class)) or revisions[record.name] != 1:
            problems.append(f"device {record.name}: {got} after {revisions[record.name]} revision(s)")
    if status_variants(found) != published:
        problems.append(f"status variants {status_variants(found)} != published {published}")
    return problems
