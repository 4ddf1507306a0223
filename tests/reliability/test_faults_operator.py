"""The operator SIGKILLed at each phase of an EdgeModel's reconcile, then restarted: it converges, nothing lost.

Real processes: ``edgefleet operator run`` against the Kubernetes API test server, the optimization
pipeline on a tiny CNN, a signed TUF repository and the fleet state in a file store; the devices are
simulated through the fleet state's own writes (:class:`~tests.reliability.cp_support.SimulatedDevices`)
so that rollouts finish. Each phase has a failpoint in the product code; a life started with
``EDGEFLEET_FAILPOINTS=<phase>=kill`` dies exactly there (checked: SIGKILL, and the log names the
failpoint), and what it left behind is checked to be what that phase leaves.

One operator set-up serves every phase, to keep the suite quick: each phase has a namespace of its
own and a life of its own scoped to it (``-n``), killed in turn; then one restarted operator without
failpoints serves all those namespaces at once. Recovery time is per model, from the restart's
``Popen`` (operator start-up included, about 4 s here) to the model's convergence, with every phase's
model reconciled by the same two workers.

Lost (must be 0), per phase: classes without a published version, duplicated versions of a class,
store files under the model that no signed target lists (half-written publishes), devices assigned
twice (a wave repeated) or never; for the finalize phase, versions still published after the
finalizer and devices not told to remove the model (or told twice).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet_core.optimize.model_io import serialize
from edgefleet_operator.fleet import model_key
from tests.reliability.cp_support import (
    CLASSES,
    MODEL,
    ControlSite,
    JsonObject,
    SimulatedDevices,
    assignment_revisions,
    condition,
    device_class,
    died_by_sigkill,
    edge_model,
    is_true,
    repository_findings,
    start_operator,
    status_variants,
    stopped_at_exit,
)
from tests.support.fleet import Process
from tests.support.fleet import wait_for as poll
from tests.support.kube_api import KubeApiServer, kube_api_server
from tests.support.reliability import Scenario, scenario, trials
from tests.support.tiny_models import tiny_cnn

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

__all__ = ["kube_api_server"]  # the fixture, used by name below

CONVERGE_S = 120.0


@dataclass(frozen=True)
class Phase:
    """A failpoint in the reconcile, the namespace slug its model lives in, and what its kill leaves."""

    failpoint: str
    slug: str
    deletes: bool = False
    """The model is deleted in the dying life (the phase is in the finalizer)."""


PHASES = (
    Phase("operator.reconcile.acknowledged", "ack"),
    Phase("operator.build.optimized", "built"),
    Phase("operator.publish.signing", "signing"),
    Phase("operator.publish.signed", "signed"),
    Phase("operator.rollout.wave", "wave"),
    Phase("operator.finalize.unassigned", "final", deletes=True),
)


def _args(site: ControlSite, server: KubeApiServer, namespaces: list[str]) -> list[str]:
    scope = [a for ns in namespaces for a in ("-n", ns)]
    return ["--store", site.url, "--keys", str(site.keys), "--server", server.url, *scope,
            "--standalone", "--workers", "2", "--rollout-poll-seconds", "0.2", "--resync-seconds", "5"]  # fmt: skip


def _model(server: KubeApiServer, namespace: str) -> JsonObject | None:
    return server.get("edgemodels", MODEL, namespace)


def _converged(server: KubeApiServer, site: ControlSite, phase: Phase, namespace: str) -> bool:
    found = _model(server, namespace)
    if phase.deletes:
        return found is None
    if found is None or not is_true(found, "Ready"):
        return False
    status: JsonObject = found["status"]
    current = status.get("observedGeneration") == found["metadata"]["generation"]
    return current and status.get("rolloutPhase") == "Succeeded"


def _check_at_death(phase: Phase, site: ControlSite, server: KubeApiServer, namespace: str) -> None:
    """What the dying life left is what its phase leaves: the kill fell where the test says it did."""
    published = site.published(namespace) or {}
    assigned = assignment_revisions(site.fleet(), namespace)
    match phase.slug:
        case "ack":
            found = _model(server, namespace)
            assert found is not None
            assert found.get("status", {}).get("observedGeneration") == 1, found.get("status")
            assert is_true(found, "Reconciling"), found.get("status")
            assert published == {}
        case "built" | "signing":
            assert published == {}
        case "signed":
            assert len(published) == 1, published  # the first class signed, the second not yet
        case "wave":
            assert sorted(published) == sorted(CLASSES), published
            assert sum(assigned.values()) == 1, assigned  # the first wave of the first class, one device
        case "final":
            assert sorted(published) == sorted(CLASSES), published
            fleet = site.fleet()
            actions = {
                d.name: fleet.assignments_for(namespace, d.name).assignments[model_key(namespace, MODEL)].action
                for d in fleet.list_devices(namespace)
            }
            assert set(actions.values()) == {"remove"}, actions


def _lost(phase: Phase, site: ControlSite, server: KubeApiServer, namespace: str) -> tuple[int, list[str]]:
    """What the restart did not get back, or got twice: a count, and what it was, in words."""
    findings = repository_findings(site, namespace)
    revisions = assignment_revisions(site.fleet(), namespace)
    fleet = site.fleet()
    devices = {d.name: d.device_class for d in fleet.list_devices(namespace)}
    problems: list[str] = [f"unlisted file {path}" for path in findings.unlisted]
    if phase.deletes:
        problems += [f"{cls}: {versions} still published" for cls, versions in findings.versions.items() if versions]
        for name in devices:
            held = fleet.assignments_for(namespace, name).assignments.get(model_key(namespace, MODEL))
            if held is None or held.action != "remove" or revisions[name] != 2:
                problems.append(f"device {name}: {held and held.action} after {revisions[name]} revision(s)")
        return len(problems), problems
    found = _model(server, namespace)
    assert found is not None
    for cls in CLASSES:
        versions = findings.versions.get(cls, [])
        if len(versions) != 1:
            problems.append(f"{cls}: versions {versions}, not exactly one")
    published = {cls: versions[-1] for cls, versions in findings.versions.items() if versions}
    for name, cls in devices.items():
        held = fleet.assignments_for(namespace, name).assignments.get(model_key(namespace, MODEL))
        if held is None or (held.action, held.version) != ("install", published.get(cls)) or revisions[name] != 1:
            problems.append(
                f"device {name}: {held and (held.action, held.version)} after {revisions[name]} revision(s)"
            )
    # The status says what the repository and the fleet hold.
    assert status_variants(found) == published, (status_variants(found), published)
    for kind, expected in (("Published", True), ("Optimized", True), ("RolledOut", True), ("Stalled", False),
                           ("Degraded", False)):  # fmt: skip
        assert is_true(found, kind) is expected, (kind, condition(found, kind))
    return len(problems), problems


def _source(folder: Path) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cnn.onnx"
    data = serialize(tiny_cnn(seed=1))
    path.write_bytes(data)
    return path.as_uri(), hashlib.sha256(data).hexdigest()


def _kill_at(
    phase: Phase, namespace: str, *, site: ControlSite, server: KubeApiServer, source: tuple[str, str],
    devices: SimulatedDevices, logs: Path, started: Callable[[Process], None],
) -> None:  # fmt: skip
    """One dying life: the namespace, its devices and model, and the operator that SIGKILLs itself at ``phase``."""
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    devices.enroll(namespace)
    life = start_operator(
        f"{namespace}-dies", logs, _args(site, server, [namespace]), failpoints=f"{phase.failpoint}=kill"
    )
    started(life)
    extra = {"artifactPolicy": "Delete"} if phase.deletes else {}
    server.create(edge_model(namespace, *source, **extra))
    if phase.deletes:
        poll(f"{namespace} ready before its delete", lambda: _converged(server, site, Phase("", ""), namespace)
             or not life.alive(), timeout=CONVERGE_S)  # fmt: skip
        server.delete("edgemodels", MODEL, namespace)
    died_by_sigkill(life, phase.failpoint)
    _check_at_death(phase, site, server, namespace)


def test_operator_killed_in_each_reconcile_phase_converges_after_restart(
    kube_api_server: KubeApiServer, tmp_path: Path
) -> None:
    server = kube_api_server
    site = ControlSite.create(tmp_path / "site")
    source = _source(tmp_path / "sources")
    logs = tmp_path / "logs"
    for cls in CLASSES:
        server.create(device_class(cls))
    records: dict[str, Scenario] = {
        p.failpoint: scenario(
            f"operator SIGKILL at {p.failpoint}",
            guards="published versions (one per class), signed targets, store files, wave assignments",
        )
        for p in PHASES
    }
    failures: list[str] = []
    with SimulatedDevices(site.fleet()) as devices, stopped_at_exit([]) as processes:
        for trial in range(trials(1, 3)):
            namespaces = {p.failpoint: f"{p.slug}-{trial}" for p in PHASES}
            for phase in PHASES:
                _kill_at(phase, namespaces[phase.failpoint], site=site, server=server, source=source,
                         devices=devices, logs=logs, started=processes.append)  # fmt: skip

            restarted_at = time.monotonic()
            restart = start_operator(f"restart-{trial}", logs, _args(site, server, list(namespaces.values())))
            processes.append(restart)
            recovered: dict[str, float] = {}

            def all_converged(
                names: dict[str, str] = namespaces, done: dict[str, float] = recovered, since: float = restarted_at
            ) -> bool:
                for phase in PHASES:
                    if phase.failpoint not in done and _converged(server, site, phase, names[phase.failpoint]):
                        done[phase.failpoint] = time.monotonic() - since
                return len(done) == len(PHASES)

            try:
                poll("every phase's model to converge after the restart", all_converged, timeout=CONVERGE_S)
            except AssertionError as exc:
                failures.append(f"trial {trial}: {exc}: converged {sorted(recovered)}\n{restart.output()[-3000:]}")
            for phase in PHASES:
                try:
                    with records[phase.failpoint].trial() as outcome:
                        assert phase.failpoint in recovered, f"{phase.failpoint}: did not converge"
                        outcome.recovered(recovered[phase.failpoint])
                        count, problems = _lost(phase, site, server, namespaces[phase.failpoint])
                        outcome.lose(count, "; ".join(problems))
                        assert count == 0, problems
                except AssertionError as exc:
                    failures.append(f"trial {trial}, {phase.failpoint}: {exc}")
            assert restart.terminate() == 0, restart.output()[-3000:]
    assert not failures, "\n".join(failures)
