"""``edgefleet pipeline-job`` and the Job dispatcher over a real store; the API server is an in-memory stand-in.

The command runs the real pipeline (a GraphOptimization-only recipe on the tiny CNN) and stages its
output in a real :class:`LocalStore`; the dispatcher reads it back as the operator does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.jobs.dispatcher import KubeJobDispatcher
from edgefleet_operator.jobs.manifest import (
    CLASS_ENV,
    EXIT_REFUSED,
    MODEL_ENV,
    JobSettings,
    StoreAccess,
    class_document,
    model_document,
)
from edgefleet_operator.jobs.pipeline_job import app
from edgefleet_operator.jobs.staging import BuildLocation, BuildReport, read_report, write_report
from edgefleet_operator.reconcile import SpecError, TransientError
from edgefleet_operator.reconcile.build_key import build_key, pinned_data_sha256
from edgefleet_operator.reconcile.dispatch import Built, Failed, Running
from tests.support.tiny_models import tiny_cnn
from tests.unit.operator.reconcile.conftest import CPU, StagedFile, device_class, edge_model, model_bytes, stage


@dataclass
class MemoryJobs:
    """Jobs by (namespace, name), as the API server would hold them; ``status`` is set by the test."""

    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.jobs.get((namespace, name))

    def create_job(self, namespace: str, job: Mapping[str, Any]) -> dict[str, Any] | None:
        key = (namespace, job["metadata"]["name"])
        if key in self.jobs:
            return None
        self.jobs[key] = json.loads(json.dumps(job))
        return self.jobs[key]

    def delete_job(self, namespace: str, name: str) -> None:
        if self.jobs.pop((namespace, name), None) is not None:
            self.deleted.append(name)

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        return [j for (ns, _), j in self.jobs.items() if ns == namespace]

    def only(self) -> dict[str, Any]:
        (job,) = self.jobs.values()
        return job


@dataclass
class Site:
    store: LocalStore
    api: MemoryJobs
    dispatcher: KubeJobDispatcher
    model: EdgeModel
    cls: DeviceClass
    key: str

    def run_job(self, job: Mapping[str, Any], **env: str) -> Any:
        """What the kubelet would do: the container's command (after ``edgefleet pipeline-job``) with its env."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        variables = {e["name"]: e["value"] for e in container["env"]}
        return CliRunner().invoke(app, container["command"][2:], env={**variables, **env})


@pytest.fixture
def source_file(tmp_path: Path) -> StagedFile:
    return stage(tmp_path / "model.onnx", model_bytes(tiny_cnn()))


@pytest.fixture
def site(tmp_path: Path, source_file: StagedFile) -> Site:
    store = LocalStore(tmp_path / "store")
    api = MemoryJobs()
    dispatcher = KubeJobDispatcher(JobSettings(image="img"), api, store, StoreAccess((tmp_path / "store").as_uri()))
    model = edge_model(source_file)
    cls = device_class(CPU)
    return Site(store, api, dispatcher, model, cls, build_key(model, cls, data_sha256=pinned_data_sha256(model.spec)))


def test_a_job_builds_and_the_dispatcher_hands_back_the_variant(site: Site) -> None:
    first = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="3")
    assert isinstance(first, Running)
    again = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="3")
    assert isinstance(again, Running)
    assert len(site.api.jobs) == 1  # idempotent: the same Job

    result = site.run_job(site.api.only())
    assert result.exit_code == 0, result.output
    assert "built factory/digits for cpu-small: version 3" in result.output
    done = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="4")
    assert isinstance(done, Built)
    assert done.version == "3"  # the version it was dispatched for
    assert set(done.variant.files) == {"model.onnx"}
    assert done.variant.self_test is not None

    rerun = site.run_job(site.api.only())  # a retried pod after the report was written
    assert rerun.exit_code == 0, rerun.output

    site.dispatcher.release(site.model, site.cls, build_key=site.key)
    assert site.store.list("builds/") == []


def test_a_spec_only_the_build_can_check_is_refused_naming_the_field(site: Site, source_file: StagedFile) -> None:
    wrong = edge_model(StagedFile(source_file.path, source_file.uri, "0" * 64))
    key = build_key(wrong, site.cls, data_sha256=None)
    assert isinstance(site.dispatcher.dispatch(wrong, site.cls, build_key=key, version="1"), Running)
    result = site.run_job(site.api.only())
    assert result.exit_code == EXIT_REFUSED, result.output
    state = site.dispatcher.dispatch(wrong, site.cls, build_key=key, version="1")
    assert isinstance(state, Failed)
    assert isinstance(state.error, SpecError)
    assert state.error.field == "spec.source.sha256"


def test_a_failed_job_is_deleted_and_reported_as_transient(site: Site) -> None:
    site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    job = site.api.only()
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit reached"}
    job["status"] = {"failed": 3, "conditions": [failed]}
    state = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    assert isinstance(state, Failed)
    assert isinstance(state.error, TransientError)
    assert "BackoffLimitExceeded" in str(state.error)
    assert site.api.jobs == {}
    assert isinstance(site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1"), Running)
    assert len(site.api.jobs) == 1  # started afresh


def test_a_finished_job_without_a_built_report_fails_with_its_reason(site: Site) -> None:
    site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    site.api.only()["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    silent = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    assert isinstance(silent, Failed)
    assert "without writing a build report" in str(silent.error)

    site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    where = BuildLocation("factory", "digits", CPU, site.key)
    write_report(site.store, where, BuildReport(outcome="error", build_key=site.key, version="1", message="disk full"))
    site.api.only()["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    failed = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    assert isinstance(failed, Failed)
    assert isinstance(failed.error, TransientError)
    assert "disk full" in str(failed.error)
    assert read_report(site.store, where) is None  # cleared for the next attempt


def test_a_build_key_from_another_version_is_an_error_not_a_refusal(site: Site, tmp_path: Path) -> None:
    env = {MODEL_ENV: json.dumps(model_document(site.model)), CLASS_ENV: json.dumps(class_document(site.cls))}
    store = (tmp_path / "store").as_uri()
    result = CliRunner().invoke(app, ["--store", store, "--build-key", "f" * 64, "--version", "1"], env=env)
    assert result.exit_code == 1
    assert "the Job image and the operator are different EdgeFleet versions" in result.output
    report = read_report(site.store, BuildLocation("factory", "digits", CPU, "f" * 64))
    assert report is not None
    assert report.outcome == "error"


def test_inputs_from_files_and_missing_inputs(site: Site, tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    base = ["--store", store, "--build-key", site.key, "--version", "1"]
    missing = CliRunner().invoke(app, base, env={MODEL_ENV: "", CLASS_ENV: ""})
    assert missing.exit_code == 1
    assert f"give --edge-model-file or set {MODEL_ENV}" in missing.output
    (tmp_path / "model.json").write_text(json.dumps(model_document(site.model)))
    (tmp_path / "class.yaml").write_text("{not yaml")
    bad = CliRunner().invoke(
        app, [*base, "--edge-model-file", str(tmp_path / "model.json"), "--device-class-file",
              str(tmp_path / "class.yaml")],
    )  # fmt: skip
    assert bad.exit_code == 1
    assert "class.yaml: not JSON or YAML" in bad.output
    assert CliRunner().invoke(app, ["--help"]).exit_code == 0


def test_a_damaged_staged_build_is_built_again(site: Site) -> None:
    site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    assert site.run_job(site.api.only()).exit_code == 0
    (staged,) = [k for k in site.store.list("builds/") if not k.endswith(".json")]
    site.store.put(staged, b"not the model")
    state = site.dispatcher.dispatch(site.model, site.cls, build_key=site.key, version="1")
    assert isinstance(state, Failed)
    assert isinstance(state.error, TransientError)
    assert "does not match its report" in str(state.error)
    assert site.store.list("builds/") == []  # built again, nothing damaged is kept
    assert site.api.jobs == {}
