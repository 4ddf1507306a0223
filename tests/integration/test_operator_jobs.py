"""``edgefleet operator run --build-mode jobs`` against the strict test API server, with a tiny kubelet.

The operator is the real command in a process of its own; it creates one batch/v1 Job per
(EdgeModel, DeviceClass). The test API server stores Jobs but runs no pods, so a "kubelet" thread
(tests/support/kubelet.py) runs each Job's container command as a real process. Everything waits
by polling; nothing sleeps a fixed time.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.jobs.manifest import EXIT_REFUSED, MODEL_LABEL
from tests.support.fleet import wait_for
from tests.support.kube_api import KubeApiServer, kube_api_server
from tests.support.kubelet import Kubelet
from tests.support.operator_process import device_class, edge_model, running_operator
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.integration

__all__ = ["kube_api_server"]  # the fixture, used by name below

NAMESPACE = "vision"
GRAPH_ONLY: dict[str, Any] = {"passes": [{"type": "GraphOptimization"}]}
JsonObject = dict[str, Any]


def condition(obj: JsonObject, kind: str) -> JsonObject:
    found = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)
    return found or {}


def variants(obj: JsonObject) -> dict[str, str]:
    return {v["deviceClass"]: v["version"] for v in obj.get("status", {}).get("variants", [])}


def operator(server: KubeApiServer, store: Path, keys: Path, log: Path) -> AbstractContextManager[object]:
    """``edgefleet operator run --build-mode jobs`` as a process, once it says it is ready."""
    args = [
        "--store", store.as_uri(), "--keys", str(keys), "--server", server.url, "-A", "--standalone",
        "--build-mode", "jobs", "--job-image", "edgefleet:test", "--job-poll-seconds", "0.5",
    ]  # fmt: skip
    return running_operator(args, log)


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

    with operator(server, store, keys, logs / "operator.log"), Kubelet(server, logs, NAMESPACE) as kubelet:
        for name in ("cpu-a", "cpu-b"):
            server.create(device_class(name))
        server.create(edge_model("digits", NAMESPACE, uri, digest, ["cpu-a", "cpu-b"]))
        server.create(edge_model("wrong-digest", NAMESPACE, uri, "0" * 64, ["cpu-a"]))

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
