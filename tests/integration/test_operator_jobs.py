"""``edgefleet operator run --build-mode jobs`` against the strict test API server, with a tiny kubelet.

The operator is the real command in a process of its own; it creates one batch/v1 Job per
(EdgeModel, DeviceClass). The test API server stores Jobs but runs no pods, so a "kubelet" thread
here does what the cluster would: it watches for Jobs, runs each one's container command as a real
process with the Job's environment (``edgefleet pipeline-job`` through ``python -m``, so it does not
depend on the entry point being installed) and writes the outcome into the Job's status (one pod,
no retries). Everything waits by polling; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.jobs.manifest import CONTAINER, EXIT_REFUSED, MODEL_LABEL
from edgefleet_operator.operator_cli import READY_LINE
from tests.support.fleet import wait_for
from tests.support.kube_api import KubeApiServer, kube_api_server
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.integration

__all__ = ["kube_api_server"]  # the fixture, used by name below

NAMESPACE = "vision"
GRAPH_ONLY: dict[str, Any] = {"passes": [{"type": "GraphOptimization"}]}
PIPELINE_JOB = [sys.executable, "-m", "edgefleet_operator.jobs.pipeline_job"]
JsonObject = dict[str, Any]


class Kubelet:
    """Runs every Job it sees once, as a process, and reports the pod's end in the Job's status."""

    def __init__(self, server: KubeApiServer, logs: Path) -> None:
        self.server = server
        self.logs = logs
        self.exits: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet")
        self.failures: list[BaseException] = []

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the kubelet did not stop"
        assert not self.failures, self.failures

    def _pending(self) -> list[JsonObject] | None:
        if self._stop.is_set():
            return None
        return [j for j in self.server.list("jobs", NAMESPACE) if j["metadata"]["name"] not in self.exits] or None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):  # nothing new: look again (the stop flag too)
                    pending = self.server.wait_until(lambda: self._pending() or self._stop.is_set(), timeout=1.0)
                    for job in pending if isinstance(pending, list) else []:
                        self._start(job)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread on exit)
            self.failures.append(exc)

    def _start(self, job: JsonObject) -> None:
        name = job["metadata"]["name"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["name"] == CONTAINER
        assert container["command"][:2] == ["edgefleet", "pipeline-job"]
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
        self._status(name, {"active": 1})
        with (self.logs / f"{name}.log").open("wb") as log:
            code = subprocess.run(
                [*PIPELINE_JOB, *container["command"][2:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=90, check=False,
            ).returncode  # fmt: skip
        self.exits[name] = code
        if code == 0:
            self._status(name, {"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        else:
            reason = "PodFailurePolicy" if code == EXIT_REFUSED else "BackoffLimitExceeded"
            failed = {"type": "Failed", "status": "True", "reason": reason, "message": f"exit code {code}"}
            self._status(name, {"active": 0, "failed": 1, "conditions": [failed]})

    def _status(self, name: str, status: JsonObject) -> None:
        self.server.patch("jobs", name, {"status": status}, namespace=NAMESPACE, subresource="status")


def condition(obj: JsonObject, kind: str) -> JsonObject:
    found = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)
    return found or {}


def variants(obj: JsonObject) -> dict[str, str]:
    return {v["deviceClass"]: v["version"] for v in obj.get("status", {}).get("variants", [])}


def device_class(name: str) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"cpu": {"arch": "x86_64", "cores": 4}, "memory": "1Gi", "precisions": ["fp32"],
                 "selector": {"matchLabels": {"edgefleet.io/class": name}}},
    }  # fmt: skip


def edge_model(name: str, uri: str, sha256: str, classes: list[str]) -> JsonObject:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"source": {"uri": uri, "sha256": sha256}, "targets": {"deviceClasses": classes},
                 "optimization": {"recipe": GRAPH_ONLY}},
    }  # fmt: skip


@contextlib.contextmanager
def operator(server: KubeApiServer, store: Path, keys: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``edgefleet operator run --build-mode jobs`` as a process, once it says it is ready."""
    args = [
        "run", "--store", store.as_uri(), "--keys", str(keys), "--server", server.url, "-A", "--standalone",
        "--build-mode", "jobs", "--job-image", "edgefleet:test", "--job-poll-seconds", "0.5",
    ]  # fmt: skip
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "edgefleet_operator.operator_cli", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert popen.poll() is None, log.read_text(errors="replace")
            return READY_LINE in log.read_text(errors="replace")

        wait_for("the operator to get ready", ready, timeout=60)
        yield popen
    finally:
        popen.terminate()
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


def test_builds_run_as_jobs_publish_stall_and_go_with_their_model(
    kube_api_server: KubeApiServer, tmp_path: Path
) -> None:
    server = kube_api_server
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    keys, store = tmp_path / "keys", tmp_path / "store"
    KeySet.generate().save(keys)
    data = serialize(tiny_cnn(seed=1))
    (tmp_path / "cnn.onnx").write_bytes(data)
    uri, digest = (tmp_path / "cnn.onnx").as_uri(), hashlib.sha256(data).hexdigest()
    logs = tmp_path / "logs"
    logs.mkdir()

    with operator(server, store, keys, logs / "operator.log"), Kubelet(server, logs) as kubelet:
        for name in ("cpu-a", "cpu-b"):
            server.create(device_class(name))
        server.create(edge_model("digits", uri, digest, ["cpu-a", "cpu-b"]))
        server.create(edge_model("wrong-digest", uri, "0" * 64, ["cpu-a"]))

        ready = server.wait_for(
            "edgemodels", "digits",
            lambda o: variants(o) == {"cpu-a": "1", "cpu-b": "1"} and condition(o, "Published").get("status") == "True",
            NAMESPACE, timeout=60,
        )  # fmt: skip
        assert ready["status"]["observedGeneration"] == 1
        jobs = server.list("jobs", NAMESPACE, label_selector=f"{MODEL_LABEL}=digits")
        assert len(jobs) == 2
        # The operator acts on the report in the store, which may come before the pod has exited.
        names = [j["metadata"]["name"] for j in jobs]
        wait_for("the digits Jobs to end", lambda: all(n in kubelet.exits for n in names), timeout=30)
        assert [kubelet.exits[n] for n in names] == [0, 0]
        assert {j["metadata"]["ownerReferences"][0]["uid"] for j in jobs} == {ready["metadata"]["uid"]}
        publisher = Publisher(LocalStore(store), KeySet.load(keys))
        assert publisher.model_versions(NAMESPACE, "digits") == {"cpu-a": ["1"], "cpu-b": ["1"]}
        assert not LocalStore(store).list(f"builds/{NAMESPACE}/digits/"), "staged builds go once published"

        # Only the build can see that the source's digest is wrong: its Job fails, the model stalls.
        stalled = server.wait_for(
            "edgemodels", "wrong-digest", lambda o: condition(o, "Stalled").get("status") == "True", NAMESPACE,
            timeout=60,
        )  # fmt: skip
        assert "spec.source.sha256" in condition(stalled, "Stalled")["message"]
        (wrong_job,) = server.list("jobs", NAMESPACE, label_selector=f"{MODEL_LABEL}=wrong-digest")
        wrong_name = wrong_job["metadata"]["name"]
        assert wait_for("the refused Job to end", lambda: kubelet.exits.get(wrong_name), timeout=30) == EXIT_REFUSED
        assert publisher.model_versions(NAMESPACE, "wrong-digest") == {}

        # Deleting the model runs the finalizer; the garbage collector then takes its Jobs (owner references).
        server.delete("edgemodels", "digits", NAMESPACE)
        server.wait_gone("edgemodels", "digits", NAMESPACE, timeout=30)
        server.wait_until(lambda: not server.list("jobs", NAMESPACE, label_selector=f"{MODEL_LABEL}=digits"), 10)
        assert len(server.list("jobs", NAMESPACE)) == 1  # the other model's Job stays
