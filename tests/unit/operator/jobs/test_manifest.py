"""Job names and objects for pipeline builds: deterministic, valid for the API server, owned by the model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_operator.jobs.manifest import (
    BUILD_KEY_LABEL,
    CLASS_ENV,
    CLASS_LABEL,
    EXIT_REFUSED,
    MODEL_ENV,
    MODEL_LABEL,
    JobSettings,
    StoreAccess,
    job_name,
    label_value,
    pipeline_job,
)
from tests.support.pod_security import restricted_violations
from tests.unit.operator.reconcile.conftest import StagedFile, device_class, edge_model

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
KEY = "ab" * 32


@pytest.fixture
def model(tmp_path: Path) -> EdgeModel:
    source = StagedFile(tmp_path / "m.onnx", (tmp_path / "m.onnx").as_uri(), "c" * 64)
    plain = edge_model(source)
    return plain.model_copy(update={"metadata": plain.metadata.model_copy(update={"uid": "0b1c-uid"})})


@pytest.mark.parametrize(
    ("model", "device_class"),
    [("digits", "cpu-small"), ("a" * 253, "b" * 253), ("x.y.z", "npu.kiosk"), ("m", "c")],
)
def test_job_names_are_short_dns_labels_and_deterministic(model: str, device_class: str) -> None:
    name = job_name("vision", model, device_class, KEY)
    assert len(name) <= 63
    assert DNS_LABEL.fullmatch(name), name
    assert name == job_name("vision", model, device_class, KEY)
    others = {job_name("vision", model, device_class, "cd" * 32), job_name("other", model, device_class, KEY)}
    assert name not in others


def test_label_values_fit() -> None:
    assert label_value("digits") == "digits"
    long = label_value("a." * 100 + "b")
    assert len(long) <= 63
    assert LABEL_VALUE.fullmatch(long)
    assert long != label_value("a." * 100 + "c")


def test_the_job_runs_pipeline_job_owned_by_the_model(model: EdgeModel) -> None:
    cls = device_class("cpu-small")
    settings = JobSettings(image="registry/edgefleet:1", service_account="builder", s3_secret="s3-creds")
    job = pipeline_job(
        settings, StoreAccess("s3://bucket/fleet", endpoint="http://minio:9000"), model, cls, build_key=KEY, version="4"
    )
    metadata = job["metadata"]
    assert metadata["namespace"] == "factory"
    assert metadata["name"] == job_name("factory", "digits", "cpu-small", KEY)
    assert metadata["labels"][MODEL_LABEL] == "digits"
    assert metadata["labels"][CLASS_LABEL] == "cpu-small"
    assert metadata["labels"][BUILD_KEY_LABEL] == KEY[:63]
    assert metadata["annotations"][BUILD_KEY_LABEL] == KEY
    assert metadata["ownerReferences"] == [
        {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "name": "digits", "uid": "0b1c-uid",
         "controller": True}
    ]  # fmt: skip
    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert EXIT_REFUSED in spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "builder"
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] == "registry/edgefleet:1"
    assert container["command"] == [
        "edgefleet", "pipeline-job", "--store", "s3://bucket/fleet", "--build-key", KEY, "--version", "4",
        "--endpoint", "http://minio:9000",
    ]  # fmt: skip
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: json.loads(e["value"]) for e in container["env"] if e["name"] in (MODEL_ENV, CLASS_ENV)}
    assert env[MODEL_ENV]["spec"] == model.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "status" not in env[MODEL_ENV]
    assert env[CLASS_ENV]["metadata"]["name"] == "cpu-small"


def test_jobs_in_another_namespace_have_no_owner(model: EdgeModel) -> None:
    job = pipeline_job(
        JobSettings(image="img", namespace="builds"), StoreAccess("file:///s"), model, device_class("c"),
        build_key=KEY, version="1",
    )  # fmt: skip
    assert job["metadata"]["namespace"] == "builds"
    assert "ownerReferences" not in job["metadata"]
    assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "options",
    [
        {"image": ""},
        {"image": "i", "poll_seconds": 0},
        {"image": "i", "backoff_limit": -1},
        {"image": "i", "memory": "4GB"},
        {"image": "i", "cpu": "two"},
    ],
)
def test_bad_job_settings_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (the message is checked by the CLI tests)
        JobSettings(**options)  # type: ignore[arg-type]


def test_the_job_is_admitted_where_restricted_pod_security_is_enforced(model: EdgeModel) -> None:
    import kubernetes_validate

    settings, store = JobSettings(image="registry/edgefleet:1"), StoreAccess("s3://b")
    job = pipeline_job(settings, store, model, device_class("cpu-small"), build_key=KEY, version="1")
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    writable = {m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    # With a read-only root, everything the pipeline writes must land on the pod's scratch volume.
    assert all(
        any(env[name].startswith(f"{path}/") for path in writable) for name in ("MPLCONFIGDIR", "EDGEFLEET_CACHE")
    )
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_job_pods_request_what_the_settings_say(model: EdgeModel) -> None:
    def resources(**options: Any) -> Any:
        job = pipeline_job(
            JobSettings(image="i", **options),
            StoreAccess("s3://b"),
            model,
            device_class("c"),
            build_key=KEY,
            version="1",
        )
        return job["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources() == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert resources(cpu="500m", memory="6Gi") == {
        "requests": {"cpu": "500m", "memory": "6Gi"},
        "limits": {"memory": "6Gi"},
    }
    assert resources(cpu=None, memory=None) == {"requests": {}}
