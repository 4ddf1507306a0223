"""The kopf operator against the strict test API server: status, events, finalizers, re-plans, crashes, HA, rollouts.

Everything is real: kopf (in a thread, or ``edgefleet operator run`` as a process that is SIGKILLed),
the reconciler and the optimization pipeline on a tiny CNN, a signed TUF repository in a file store,
and for the rollout the gateway and agent processes. Nothing waits a fixed time: every wait polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.kopf_app import FINALIZER, KopfSettings, identity_priority, serve
from edgefleet_operator.operator_cli import READY_LINE, app
from edgefleet_operator.runtime import OperatorSettings
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc
from tests.support.fleet import Process, fleet_site, gateway_address, inference_address
from tests.support.fleet import wait_for as poll
from tests.support.kube_api import KubeApiServer, kube_api_server, matching, running_kube_api
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.integration

__all__ = ["kube_api_server"]  # the fixture, used by name below

NAMESPACE = "vision"
GRAPH_ONLY: dict[str, Any] = {"passes": [{"type": "GraphOptimization"}]}
"""A recipe the pipeline runs in milliseconds on the tiny CNN."""
OPERATOR = [sys.executable, "-m", "edgefleet_operator.operator_cli"]
"""``edgefleet operator`` (the same Typer app the ``edgefleet`` command mounts)."""
_READY = re.compile(re.escape(READY_LINE) + r" identity=(\S+)")
JsonObject = dict[str, Any]


# ---------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Source:
    uri: str
    sha256: str


def source(folder: Path, seed: int) -> Source:
    """The tiny CNN with ``seed`` written to ``folder``, as an EdgeModel names it."""
    path = folder / f"cnn-{seed}.onnx"
    data = serialize(tiny_cnn(seed=seed))
    path.write_bytes(data)
    return Source(path.as_uri(), hashlib.sha256(data).hexdigest())


def device_class(name: str, *, cores: int = 4, labels: dict[str, str] | None = None) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "cpu": {"arch": "x86_64", "cores": cores},
            "memory": "1Gi",
            "precisions": ["fp32"],
            "selector": {"matchLabels": {"edgefleet.io/class": name}},
        },
    }


def edge_model(name: str, src: Source, classes: list[str], **spec: Any) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"uri": src.uri, "sha256": src.sha256},
            "targets": {"deviceClasses": classes},
            "optimization": {"recipe": GRAPH_ONLY},
            **spec,
        },
    }


def condition(obj: JsonObject, kind: str) -> JsonObject | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def is_true(obj: JsonObject, kind: str) -> bool:
    found = condition(obj, kind)
    return found is not None and found["status"] == "True"


def variants(obj: JsonObject) -> dict[str, str]:
    """Device class → variant version in the status."""
    return {v["deviceClass"]: v["version"] for v in obj.get("status", {}).get("variants", [])}


def current(server: KubeApiServer, name: str) -> JsonObject:
    found = server.get("edgemodels", name, NAMESPACE)
    assert found is not None, f"EdgeModel {name} is gone"
    return found


def events(server: KubeApiServer, name: str) -> list[JsonObject]:
    return [e for e in server.list("events", NAMESPACE) if e["involvedObject"].get("name") == name]


@dataclass(frozen=True)
class Site:
    """A file store with an initialized TUF repository and the keys it is signed with."""

    folder: Path

    @property
    def store(self) -> Path:
        return self.folder / "store"

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    def settings(self, **options: Any) -> OperatorSettings:
        return OperatorSettings(store_url=self.store.as_uri(), keys_dir=self.keys, **options)

    def publisher(self) -> Publisher:
        return Publisher(LocalStore(self.store), KeySet.load(self.keys))

    def published(self, model: str) -> dict[str, list[str]] | None:
        """Class → versions published for ``model``; ``None`` while the repository is mid-write."""
        try:
            return self.publisher().model_versions(NAMESPACE, model)
        except EdgeFleetError:
            return None


@pytest.fixture
def site(tmp_path: Path) -> Site:
    made = Site(tmp_path / "site")
    KeySet.generate().save(made.keys)
    return made


@pytest.fixture
def server(kube_api_server: KubeApiServer) -> KubeApiServer:
    kube_api_server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    return kube_api_server


@contextlib.contextmanager
def operator_thread(settings: OperatorSettings, kopf_settings: KopfSettings) -> Iterator[None]:
    """The operator (kopf and the reconciler) in a thread with its own event loop, stopped through its flag."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(serve(settings, kopf_settings, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread below)
            failures.append(exc)

    thread = threading.Thread(target=run, name="edgefleet-operator")
    thread.start()
    try:
        poll("the operator to get ready", lambda: ready.is_set() or bool(failures), timeout=30)
        assert not failures, failures
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the operator did not stop"
    assert not failures, failures


_STARTED: list[Process] = []


@pytest.fixture(autouse=True)
def _stop_operators() -> Iterator[None]:
    """Every operator process a test started is gone after it, whatever happened."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.kill()


def start_operator(name: str, folder: Path, *args: str) -> Process:
    """``edgefleet operator run ARGS`` as a process; waits for its ready line."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    offset = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [*OPERATOR, "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    process = Process(name, list(args), log, popen)
    _STARTED.append(process)

    def ready() -> re.Match[str] | None:
        if popen.poll() is not None:
            raise AssertionError(f"{name} exited with {popen.returncode}\n{process.output()}")
        return _READY.search(process.output()[offset:])

    process.match = poll(f"{name} to be ready", ready, timeout=60)
    return process


def operator_args(site: Site, server_url: str, *extra: str) -> list[str]:
    return ["--store", site.store.as_uri(), "--keys", str(site.keys), "--server", server_url, *extra]


# ---------------------------------------------------------------------------------- the CLI


def test_crds_print_every_definition_and_run_checks_its_options(tmp_path: Path) -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["crds"])
    assert printed.exit_code == 0, printed.output
    documents = list(yaml.safe_load_all(printed.stdout))
    assert [d["metadata"]["name"] for d in documents] == [
        "deviceclasses.edgefleet.io",
        "edgemodels.edgefleet.io",
        "edgedevices.edgefleet.io",
    ]
    with_peering = list(yaml.safe_load_all(runner.invoke(app, ["crds", "--peering"]).stdout))
    assert {d["spec"]["names"]["kind"] for d in with_peering[3:]} == {"ClusterKopfPeering", "KopfPeering"}
    for command in (["--help"], ["run", "--help"], ["crds", "--help"]):
        assert runner.invoke(app, command).exit_code == 0, command

    base = ["run", "--store", (tmp_path / "s").as_uri(), "--keys", str(tmp_path / "k"), "--server", "http://x"]
    no_scope = runner.invoke(app, [*base, "--standalone"])
    assert no_scope.exit_code == 2
    assert "--all-namespaces" in no_scope.output
    both = runner.invoke(app, [*base, "-A", "--standalone", "--peering", "p"])
    assert both.exit_code == 2
    assert "--standalone" in both.output
    bad_metrics = runner.invoke(app, [*base, "-A", "--standalone", "--metrics-listen", "9090"])
    assert bad_metrics.exit_code == 1
    assert "--metrics-listen '9090' is not HOST:PORT" in bad_metrics.output


def test_run_without_a_repository_and_root_keys_fails_naming_the_fix(
    server: KubeApiServer, site: Site, tmp_path: Path
) -> None:
    online = tmp_path / "online-keys"
    online.mkdir()
    for name, content in KeySet.load(site.keys).to_files(online_only=True).items():
        (online / name).write_bytes(content)
    result = subprocess.run(
        [*OPERATOR, "run", "--store", site.store.as_uri(), "--keys", str(online), "--server", server.url,
         "-A", "--standalone"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: " in result.stderr
    assert "edgefleet keys init" in result.stderr
    assert not site.store.exists() or not any(site.store.rglob("*.json"))


# ---------------------------------------------------------------------------------- in-process lifecycle


def test_edgemodels_reach_ready_stall_on_bad_specs_replan_and_finalize(
    server: KubeApiServer, site: Site, tmp_path: Path
) -> None:
    first, second = source(tmp_path, 1), source(tmp_path, 2)
    settings = site.settings(cache_dir=tmp_path / "cache")
    with operator_thread(settings, KopfSettings(server=server.url, tick_seconds=0.1, identity="in-process")):
        for name in ("cpu-a", "cpu-b"):
            server.create(device_class(name))
        server.create(edge_model("digits", first, ["cpu-a", "cpu-b"], artifactPolicy="Delete"))
        server.create(edge_model("typo", first, ["cpu-a", "cpu-c"]))
        wrong = Source(first.uri, "0" * 64)
        server.create(edge_model("wrong-digest", wrong, ["cpu-a"]))

        ready = server.wait_for(
            "edgemodels", "digits", lambda o: variants(o) == {"cpu-a": "1", "cpu-b": "1"} and is_true(o, "Published"),
            NAMESPACE, timeout=60,
        )  # fmt: skip
        assert ready["status"]["observedGeneration"] == 1
        assert ready["status"]["version"] == "1"
        assert is_true(ready, "Optimized")
        assert ready["status"]["rolloutPhase"] == "Pending"  # no devices yet: nothing to roll out to
        assert FINALIZER in ready["metadata"]["finalizers"]
        assert site.published("digits") == {"cpu-a": ["1"], "cpu-b": ["1"]}
        published = server.wait_until(
            lambda: [e for e in events(server, "digits") if e["reason"] == "VariantPublished"] or None
        )
        assert published[0]["type"] == "Normal"

        # Bad specs stall with the field named; the good model is left alone.
        typo = server.wait_for("edgemodels", "typo", lambda o: is_true(o, "Stalled"), NAMESPACE, timeout=30)
        assert "spec.targets.deviceClasses[1]" in condition(typo, "Stalled")["message"]  # type: ignore[index]
        digest = server.wait_for("edgemodels", "wrong-digest", lambda o: is_true(o, "Stalled"), NAMESPACE, timeout=30)
        assert "spec.source.sha256" in condition(digest, "Stalled")["message"]  # type: ignore[index]
        assert site.published("typo") == {}
        assert site.published("wrong-digest") == {}
        assert current(server, "digits")["metadata"]["resourceVersion"] == ready["metadata"]["resourceVersion"]

        # A spec change is a new version on every class.
        server.patch("edgemodels", "digits", {"spec": {"source": {"uri": second.uri, "sha256": second.sha256}}},
                     namespace=NAMESPACE)  # fmt: skip
        changed = server.wait_for(
            "edgemodels", "digits", lambda o: variants(o) == {"cpu-a": "2", "cpu-b": "2"}, NAMESPACE, timeout=60
        )
        assert changed["status"]["observedGeneration"] == 2
        # Each generation was acknowledged (Reconciling, not Ready) before the reconcile that built it
        # wrote its result: GitOps tools never see a new spec with an old or missing status as done.
        for generation in (1, 2):
            first = next(
                v["status"] for v in server.versions("edgemodels", "digits", NAMESPACE)
                if v.get("status", {}).get("observedGeneration") == generation
            )  # fmt: skip
            assert is_true({"status": first}, "Reconciling"), first
            assert condition({"status": first}, "Ready")["status"] == "False"  # type: ignore[index]
            assert condition({"status": first}, "Ready")["reason"] == "Progressing"  # type: ignore[index]
            assert str(generation) not in variants({"status": first}).values()

        # A DeviceClass change re-plans the models that target it, and only their builds for it.
        server.patch("deviceclasses", "cpu-b", {"spec": {"cpu": {"cores": 8}}})
        replanned = server.wait_for(
            "edgemodels", "digits", lambda o: variants(o) == {"cpu-a": "2", "cpu-b": "3"}, NAMESPACE, timeout=60
        )
        assert replanned["status"]["observedGeneration"] == 2  # the spec did not change
        server.create(device_class("cpu-c"))  # the missing class appears: the stalled model recovers
        server.wait_for("edgemodels", "typo", lambda o: not is_true(o, "Stalled") and len(variants(o)) == 2,
                        NAMESPACE, timeout=60)  # fmt: skip

        # Deleting runs the finalizer (artifactPolicy Delete: unpublished), then the object goes.
        server.delete("edgemodels", "digits", NAMESPACE)
        server.wait_gone("edgemodels", "digits", NAMESPACE, timeout=30)
        assert site.published("digits") == {}
        assert site.published("typo") == {"cpu-a": ["1"], "cpu-c": ["1"]}
    writes = [r for r in server.audit_log() if r.request.verb in ("create", "patch", "update", "delete")]
    assert all(r.code < 400 for r in writes if "edgefleet-operator" in r.request.user_agent), [
        r for r in writes if r.code >= 400
    ]


# ---------------------------------------------------------------------------------- crashes and replicas


def test_sigkill_mid_pipeline_then_restart_converges_without_duplicates(
    server: KubeApiServer, site: Site, tmp_path: Path
) -> None:
    classes = ["cpu-a", "cpu-b", "cpu-c"]
    for name in classes:
        server.create(device_class(name))
    server.create(edge_model("digits", source(tmp_path, 1), classes))
    # The API server refuses every status write until the last life: nothing the first two lives
    # did is remembered in the EdgeModel, only in the repository.
    status_writes = matching(verb="patch", resource="edgemodels", subresource="status")
    refused = server.fail_next(1_000_000, 503, when=status_writes)
    args = operator_args(site, server.url, "-A", "--standalone", "--workers", "1")
    logs = tmp_path / "logs"

    # Life 1: killed as soon as a first variant is in the repository (the others may still be
    # unpublished): a power cut, the OOM killer.
    first = start_operator("operator", logs, *args)
    poll("a first variant published", lambda: site.published("digits") or None, timeout=90, every=0.01)
    first.kill()

    # Life 2: killed once every class is published and its status write has been refused: the
    # builds are in the repository, the EdgeModel says nothing of them.
    second = start_operator("operator", logs, *args)
    hits_before = len(refused.hits)
    poll(
        "every class published and a status write refused",
        lambda: len(site.published("digits") or {}) == len(classes) and len(refused.hits) > hits_before,
        timeout=90,
    )
    second.kill()
    before_last = site.published("digits")
    assert before_last is not None
    assert "status" not in current(server, "digits")

    # Life 3, with status writes allowed again: it adopts what is published and builds nothing.
    signed_before = _targets_versions(site)
    refused.remaining = 0
    third = start_operator("operator", logs, *args, "--metrics-listen", "127.0.0.1:0")
    done = server.wait_for(
        "edgemodels", "digits", lambda o: len(variants(o)) == len(classes) and is_true(o, "Published"),
        NAMESPACE, timeout=90,
    )  # fmt: skip
    assert site.published("digits") == before_last
    assert all(len(versions) == 1 for versions in before_last.values()), before_last  # nothing built twice
    assert variants(done) == {c: v[0] for c, v in before_last.items()}
    assert done["status"]["observedGeneration"] == 1
    assert _targets_versions(site) == signed_before  # no new targets metadata: nothing was published
    # And the store holds one copy of each: a published version's folder has its manifest and model.
    targets = site.store / "tuf" / "targets"
    for cls, (version,) in before_last.items():
        files = sorted(p.name.split(".", 1)[1] for p in (targets / cls / NAMESPACE / "digits" / version).iterdir())
        assert files == ["manifest.json", "model.onnx.eft"], (cls, files)
    # (A publish cut short between writing its files and signing them leaves those files behind,
    # unreferenced and never served; the retry publishes under the next version.)
    # Its metrics (--metrics-listen) say the same: reconciles, no build and no publish, the model settled.
    scraped = _scrape(third)
    assert scraped['edgefleet_operator_reconciles_total{outcome="ok"}'] >= 1
    assert not [k for k, v in scraped.items() if k.startswith("edgefleet_operator_build_duration_seconds_count") and v]
    assert scraped['edgefleet_operator_publish_duration_seconds_count{outcome="published"}'] == 0
    assert scraped['edgefleet_operator_edgemodels{condition="Published",status="True"}'] == 1
    pending = 'edgefleet_operator_rollout_state{edgemodel="digits",namespace="vision",state="Pending"}'
    assert scraped[pending] == 1  # no devices: nothing to roll out to
    assert third.terminate() == 0, third.output()[-3000:]


def _scrape(operator: Process) -> dict[str, float]:
    """The operator's ``/metrics`` (it printed where), as sample line (name and labels) → value."""
    found = re.search(r"metrics on (http://\S+/metrics)", operator.output())
    assert found is not None, operator.output()[-2000:]
    with urllib.request.urlopen(found[1], timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines if not line.startswith("#")}


def _targets_versions(site: Site) -> list[str]:
    """The signed targets metadata versions in the repository (a publish adds one)."""
    return sorted(p.name for p in (site.store / "tuf" / "metadata").glob("*.targets.json"))


def test_two_replicas_with_peering_only_one_acts_and_the_other_takes_over(site: Site, tmp_path: Path) -> None:
    with running_kube_api(kopf_peering=True) as server:
        server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        server.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "edgefleet"}})
        server.create(device_class("cpu-a"))
        common = operator_args(site, server.url, "-A", "--peering", "edgefleet")
        logs = tmp_path / "logs"
        # Two pods of one Deployment: the same flags, no --priority; only their names differ, and
        # the priority each derives from its name must differ (equal ones would all pause).
        pods = sorted(("edgefleet-operator-5d8c7-x2kqf", "edgefleet-operator-5d8c7-m9zt4"), key=identity_priority)
        low_name, high_name = pods
        assert identity_priority(low_name) < identity_priority(high_name)
        high = start_operator("replica-high", logs, *common, "--identity", high_name)
        low = start_operator("replica-low", logs, *common, "--identity", low_name)
        # A replica with a mandatory peering starts paused; the highest live one resumes.
        poll("the high-priority replica to act", lambda: "Resuming operations" in high.output())
        poll("both replicas in the peering", lambda: set(pods) <= _peers(server))
        assert "Resuming operations" not in low.output()

        src = source(tmp_path, 1)
        server.create(edge_model("digits", src, ["cpu-a"]))
        server.wait_for("edgemodels", "digits", lambda o: variants(o) == {"cpu-a": "1"}, NAMESPACE, timeout=60)
        assert _writers(server) == {high_name}

        # The active replica goes away: the other resumes and serves the next change.
        assert high.terminate() == 0, high.output()[-3000:]
        poll("the low-priority replica to resume", lambda: "Resuming operations" in low.output(), timeout=30)
        server.clear_audit_log()
        second = source(tmp_path, 2)
        server.patch("edgemodels", "digits", {"spec": {"source": {"uri": second.uri, "sha256": second.sha256}}},
                     namespace=NAMESPACE)  # fmt: skip
        server.wait_for("edgemodels", "digits", lambda o: variants(o) == {"cpu-a": "2"}, NAMESPACE, timeout=60)
        assert _writers(server) == {low_name}
        low.terminate()  # kopf may log an AssertionError as a formerly paused replica stops: its exit code is kopf's


def _peers(server: KubeApiServer) -> set[str]:
    peering = server.get("clusterkopfpeerings", "edgefleet")
    return set(peering.get("status") or {}) if peering is not None else set()


def _writers(server: KubeApiServer) -> set[str]:
    """Identities of the replicas that wrote anything but their own peering record."""
    found = set()
    for record in server.audit_log():
        request = record.request
        if request.verb in ("create", "patch", "update", "delete") and "peering" not in request.resource:
            match = re.search(r"edgefleet-operator/\S+ \((\S+)\)", request.user_agent)
            if match is not None:
                found.add(match.group(1))
    return found


# ---------------------------------------------------------------------------------- a rollout with devices


def _bad_predict(address: str) -> None:
    """A request the model refuses (wrong shape): the device counts it as an error of the active version."""
    tensor = inference_pb2.Tensor(
        name="input", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[1, 1, 3, 3], data=b"\0" * 36
    )
    with grpc.insecure_channel(address) as channel, contextlib.suppress(grpc.RpcError):
        inference_pb2_grpc.InferenceStub(channel).Predict(
            inference_pb2.PredictRequest(model_name="digits", inputs=[tensor]), timeout=10
        )


def _assigned(fleet: FleetState, device: str) -> str | None:
    held = fleet.assignments_for(NAMESPACE, device).assignments.get(f"{NAMESPACE}/digits")
    return None if held is None else f"{held.action} {held.version}"


def test_a_rollout_to_real_agents_succeeds_then_a_failing_gate_rolls_back(
    server: KubeApiServer, tmp_path: Path
) -> None:
    with fleet_site(tmp_path / "site") as edge:
        store = edge.folder / "store"
        # Devices trust the repository's root from the start: the operator's keys include the root keys.
        edge.trusted_root.write_bytes(Publisher(LocalStore(store), KeySet.load(edge.keys)).ensure_initialized())
        gateway = edge.start_gateway()
        fleet_address, enroll_address = gateway_address(gateway)
        agents = {
            name: edge.start_agent(
                name, gateway=fleet_address, enroll_gateway=enroll_address,
                token=edge.token("cpu-small", namespace=NAMESPACE), extra=("--heartbeat-interval", "0.2"),
            )
            for name in ("edge-a", "edge-b")
        }  # fmt: skip
        fleet = FleetState(LocalStore(store))
        settings = OperatorSettings(
            store_url=store.as_uri(), keys_dir=edge.keys, rollout_poll_seconds=0.3, resync_seconds=5.0
        )
        rollout = {
            "waves": [{"percent": 50}, {"percent": 100}],
            "healthGates": {"maxErrorRate": 0.05, "observationWindow": "1s", "minReports": 1},
            "autoRollback": True,
        }
        with operator_thread(settings, KopfSettings(server=server.url, tick_seconds=0.1, identity="rollout")):
            server.create(device_class("cpu-small"))
            server.create(edge_model("digits", source(tmp_path, 1), ["cpu-small"], rollout=rollout))
            ready = server.wait_for("edgemodels", "digits", lambda o: is_true(o, "Ready"), NAMESPACE, timeout=90)
            assert ready["status"]["rolloutPhase"] == "Succeeded"
            assert {d: _assigned(fleet, d) for d in agents} == dict.fromkeys(agents, "install 1")

            # Version 2: its first wave reaches one device, which then fails most requests.
            second = source(tmp_path, 2)
            server.patch("edgemodels", "digits", {"spec": {"source": {"uri": second.uri, "sha256": second.sha256}}},
                         namespace=NAMESPACE)  # fmt: skip
            canary = poll(
                "a canary of version 2", lambda: next((d for d in agents if _assigned(fleet, d) == "install 2"), None)
            )

            def rolled_back() -> JsonObject | None:
                _bad_predict(inference_address(agents[canary]))
                found = current(server, "digits")
                return found if found.get("status", {}).get("rolloutPhase") == "RolledBack" else None

            failed = poll("the failing gate to roll version 2 back", rolled_back, timeout=90, every=0.05)
            assert is_true(failed, "Degraded")
            assert not is_true(failed, "Ready")
            assert "error rate" in condition(failed, "Degraded")["message"]  # type: ignore[index]
            warnings = server.wait_until(
                lambda: (
                    [e for e in events(server, "digits") if e["reason"] == "RolledBack" and e["type"] == "Warning"]
                    or None
                )
            )
            assert "cpu-small" in warnings[0]["message"]
            poll("the canary back on version 1", lambda: _assigned(fleet, canary) in ("rollback 1", "install 1"))
            others = [d for d in agents if d != canary]
            assert all(_assigned(fleet, d) == "install 1" for d in others)  # the second wave never started
