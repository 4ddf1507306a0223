"""The batch/v1 Job that builds one (EdgeModel, DeviceClass) for one build key. Pure: no IO.

One Job per build key, with a name derived from (namespace, model, class, build key), so that
creating it again is a harmless 409 and a restarted operator finds the Job it started. The Job
runs ``edgefleet pipeline-job`` with the model and class as JSON in its environment and writes its
outcome to the artifact store (:mod:`.staging`); it gets no signing keys and no API token.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from edgefleet_core.resources.base import API_GROUP, API_VERSION
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel

CONTAINER: Final = "pipeline"
MODEL_ENV: Final = "EDGEFLEET_EDGE_MODEL"
"""The EdgeModel (apiVersion, kind, metadata name/namespace/uid, spec) as JSON."""
CLASS_ENV: Final = "EDGEFLEET_DEVICE_CLASS"
"""The DeviceClass (apiVersion, kind, metadata name/labels, spec) as JSON."""
MODEL_LABEL: Final = "edgefleet.io/model"
CLASS_LABEL: Final = "edgefleet.io/device-class"
BUILD_KEY_LABEL: Final = "edgefleet.io/build-key"
"""The build key's first 63 hex digits (a label value's limit); the annotation of the same name has all 64."""
VERSION_ANNOTATION: Final = "edgefleet.io/version"
COMPONENT_LABELS: Final = {
    "app.kubernetes.io/name": "edgefleet-pipeline",
    "app.kubernetes.io/managed-by": "edgefleet-operator",
}
EXIT_USAGE: Final = 2
"""``edgefleet pipeline-job`` was called wrongly (click's usage error): a retry cannot help."""
EXIT_REFUSED: Final = 3
"""The spec cannot be met (the report says which field): the pipeline is deterministic, a retry cannot help."""
NAME_PREFIX: Final = "ef-"
_HASH_CHARS: Final = 20
"""80 bits of sha256 in the Job's name: collisions between builds are out of reach."""
_MAX_NAME: Final = 63
"""A Job's name becomes its pods' ``job-name`` label value: 63 characters at most."""
_NOT_NAME: Final = re.compile(r"[^a-z0-9-]+")
_QUANTITY: Final = re.compile(r"(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
"""A Kubernetes resource quantity, as far as CPUs and bytes are written (no exponents)."""


POD_SECURITY: Final[dict[str, Any]] = {
    "runAsNonRoot": True,
    "runAsUser": 65532,  # the image's user (operator/Dockerfile)
    "runAsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""The Pod Security Standard ``restricted``: a namespace that enforces it admits the Job's pods."""
CONTAINER_SECURITY: Final[dict[str, Any]] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
SCRATCH_MOUNT: Final = "/tmp"  # noqa: S108  (an emptyDir of the pod's own, not a shared /tmp)
SCRATCH_SIZE: Final = "2Gi"


@dataclass(frozen=True)
class JobSettings:
    """How pipeline Jobs are made; built once from the command line."""

    image: str
    """The container image with the ``edgefleet`` command (the operator's own image, usually)."""
    namespace: str | None = None
    """Where the Jobs run; ``None``: in each EdgeModel's namespace (then the model owns its Jobs, and
    deleting the model deletes them). In another namespace the finalizer deletes them instead."""
    service_account: str | None = None
    """The Jobs' pods run as this ServiceAccount (e.g. one bound to cloud storage credentials)."""
    s3_secret: str | None = None
    """A Secret whose keys become the pods' environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``)."""
    backoff_limit: int = 2
    """Pod failures (other than a refused spec) retried before the Job fails."""
    active_deadline_seconds: int = 3600
    """A Job running longer fails (and the operator starts it afresh after its backoff)."""
    ttl_seconds_after_finished: int = 86400
    """Finished Jobs are deleted by the cluster after this long (their outcome is in the store)."""
    poll_seconds: float = 10.0
    """How soon a model with a running Job is looked at again."""
    cpu: str | None = "1"
    """CPU the pods request (a Kubernetes quantity); ``None``: no request."""
    memory: str | None = "2Gi"
    """Memory the pods request and are limited to (the pipeline's peak is the model several times over)."""

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("the pipeline Job image is empty")
        if min(self.backoff_limit, self.active_deadline_seconds - 1, self.ttl_seconds_after_finished) < 0:
            raise ValueError("backoff limit, deadline and TTL must be positive")
        if self.poll_seconds <= 0:
            raise ValueError("the Job poll interval must be positive")
        for what, quantity in (("CPU", self.cpu), ("memory", self.memory)):
            if quantity is not None and not _QUANTITY.fullmatch(quantity):
                raise ValueError(f"the Job {what} {quantity!r} is not a Kubernetes quantity such as 500m, 2 or 4Gi")


@dataclass(frozen=True)
class StoreAccess:
    """How the Job reaches the artifact store (credentials come from ``JobSettings.s3_secret``)."""

    url: str
    endpoint: str | None = None
    region: str | None = None


def job_name(namespace: str, model: str, device_class: str, build_key: str) -> str:
    """A DNS-1123 label of at most 63 characters, the same for the same build, different for another.

    Readable parts of the model and class names, then 20 hex digits of sha256 over all four parts
    (the names may be cut, the hash never is).
    """
    digest = hashlib.sha256("\0".join((namespace, model, device_class, build_key)).encode()).hexdigest()
    room = _MAX_NAME - len(NAME_PREFIX) - _HASH_CHARS - 2  # two dashes
    model_part = _label_safe(model)[: (room + 1) // 2].strip("-")
    class_part = _label_safe(device_class)[: room - len(model_part)].strip("-")
    parts = [p for p in (model_part, class_part, digest[:_HASH_CHARS]) if p]
    return NAME_PREFIX + "-".join(parts)


def label_value(value: str) -> str:
    """``value`` as a label value: itself when it fits 63 characters, else a cut with a hash."""
    if len(value) <= _MAX_NAME:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:_HASH_CHARS]
    return value[: _MAX_NAME - _HASH_CHARS - 1].rstrip("-.") + "-" + digest


def build_labels(model: EdgeModel, device_class: DeviceClass, build_key: str) -> dict[str, str]:
    return {
        **COMPONENT_LABELS,
        MODEL_LABEL: label_value(model.metadata.name),
        CLASS_LABEL: label_value(device_class.metadata.name),
        BUILD_KEY_LABEL: build_key[:_MAX_NAME],
    }


def model_selector(model: EdgeModel) -> str:
    """A label selector for every pipeline Job of ``model``."""
    return f"{MODEL_LABEL}={label_value(model.metadata.name)},app.kubernetes.io/name=edgefleet-pipeline"


def model_document(model: EdgeModel) -> dict[str, Any]:
    """What the Job needs of the EdgeModel: its identity and spec (no status, no kopf annotations)."""
    metadata = {"name": model.metadata.name, "namespace": model.metadata.namespace, "uid": model.metadata.uid}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "EdgeModel",
        "metadata": {k: v for k, v in metadata.items() if v is not None},
        "spec": model.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def class_document(device_class: DeviceClass) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "DeviceClass",
        "metadata": {"name": device_class.metadata.name, "labels": dict(device_class.metadata.labels)},
        "spec": device_class.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def job_namespace(settings: JobSettings, model: EdgeModel) -> str:
    return settings.namespace or model.metadata.namespace or "default"


def pipeline_job(
    settings: JobSettings,
    store: StoreAccess,
    model: EdgeModel,
    device_class: DeviceClass,
    *,
    build_key: str,
    version: str,
) -> dict[str, Any]:
    """The Job object (for ``POST /apis/batch/v1/namespaces/<ns>/jobs``)."""
    namespace = job_namespace(settings, model)
    labels = build_labels(model, device_class, build_key)
    metadata: dict[str, Any] = {
        "name": job_name(
            model.metadata.namespace or "default", model.metadata.name, device_class.metadata.name, build_key
        ),
        "namespace": namespace,
        "labels": labels,
        "annotations": {BUILD_KEY_LABEL: build_key, VERSION_ANNOTATION: version},
    }
    if model.metadata.uid is not None and namespace == model.metadata.namespace:
        # Owner references cannot cross namespaces; in the model's own, the garbage collector
        # deletes the model's Jobs (and their pods) with it.
        metadata["ownerReferences"] = [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "EdgeModel",
                "name": model.metadata.name,
                "uid": model.metadata.uid,
                "controller": True,
            }
        ]
    command = ["edgefleet", "pipeline-job", "--store", store.url, "--build-key", build_key, "--version", version]
    if store.endpoint is not None:
        command += ["--endpoint", store.endpoint]
    if store.region is not None:
        command += ["--region", store.region]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "command": command,
        "env": [
            {"name": MODEL_ENV, "value": json.dumps(model_document(model), sort_keys=True)},
            {"name": CLASS_ENV, "value": json.dumps(class_document(device_class), sort_keys=True)},
            # The root filesystem is read-only: matplotlib (the report's plots) writes its cache here.
            {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_MOUNT}/matplotlib"},
            {"name": "EDGEFLEET_CACHE", "value": f"{SCRATCH_MOUNT}/edgefleet-cache"},
        ],
        "securityContext": CONTAINER_SECURITY,
        "resources": _resources(settings),
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH_MOUNT}],
    }
    if settings.s3_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the Job talks to the store, never to the API server
        "securityContext": POD_SECURITY,
        "containers": [container],
        # ONNX Runtime's quantizer and the pipeline's temporary models go to /tmp.
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": SCRATCH_SIZE}}],
    }
    if settings.service_account is not None:
        pod_spec["serviceAccountName"] = settings.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            # A refused spec or a wrong invocation fails the same way every time: no retries.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [EXIT_USAGE, EXIT_REFUSED],
                        },
                    }
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _label_safe(name: str) -> str:
    return _NOT_NAME.sub("-", name.lower())


def _resources(settings: JobSettings) -> dict[str, Any]:
    """Requests the scheduler places the pod by; memory is also the limit (a build past it is OOM-killed
    and retried, rather than starving the node), CPU is not (a build may use idle cores)."""
    requests = {name: value for name, value in (("cpu", settings.cpu), ("memory", settings.memory)) if value}
    limits = {"memory": settings.memory} if settings.memory else {}
    return {"requests": requests, **({"limits": limits} if limits else {})}
